"""Console entry point ``tissuesim`` (DESIGN.md section 4).

``tissuesim [overrides]`` runs one simulation, ``tissuesim -m [overrides]`` sweeps. Before Hydra
creates any run directory, :func:`preflight` composes the configuration for every value a sweep
will take and validates it, so a bad value fails at once with one line naming key, value and
what is allowed, and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tissuesim.config import ConfigError, conf_dir, group_options, validate

log = logging.getLogger("tissuesim")

# Hydra flags that take a value, and flags after which no simulation runs.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun"}
_NO_RUN_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-i"}
_UNSUPPORTED_PREFLIGHT = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn"}

EXIT_CONFIG = 2


def _split_argv(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun, skip_preflight) from a tissuesim command line."""
    overrides: list[str] = []
    multirun = False
    skip = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in _NO_RUN_FLAGS or a.split("=")[0] in _UNSUPPORTED_PREFLIGHT:
            skip = True
        elif a in _FLAGS_WITH_VALUE:
            i += 1 if i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1] else 0
        elif not a.startswith("-"):
            overrides.append(a)
        i += 1
    return overrides, multirun, skip


def _one_line(exc: BaseException) -> str:
    """First meaningful line of an exception raised while composing the configuration."""
    from omegaconf.errors import OmegaConfBaseException

    chain = []
    e: BaseException | None = exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            msg = str(getattr(e, "msg", "") or e).splitlines()[0]
            if "could not be converted to" in msg:
                wanted = msg.rsplit(" ", 1)[-1].lower()
                return f"{msg}; allowed: {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}"
            if "is not a valid bool" in msg:
                return f"{msg}; allowed: true or false"
            return msg
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines[:1]) if lines else type(exc).__name__


def _describe_override_error(ov, exc: BaseException, value: str | None = None) -> str:
    """One line for a failed override: unknown group option, unknown key, bad type, ...

    value : for a sweep, the one value that failed (the message names it, not the whole list).
    """
    from hydra.errors import MissingConfigException

    key = ov.key_or_group
    if value is None and not ov.is_sweep_override():
        value = ov.get_value_element_as_str()
    shown = f"{ov.get_key_element()}={value}" if value is not None else ov.input_line
    if value is not None and ov.is_sweep_override():
        shown += f" (in the sweep {ov.input_line})"
    chain = []
    e: BaseException | None = exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(c, MissingConfigException) for c in chain) and key.startswith("hydra/launcher"):
        return f"{shown}: launcher plugin not installed; install it with pip install -e '.[sweep]' (joblib, submitit)"
    if any(isinstance(c, MissingConfigException) for c in chain) and (conf_dir() / key).is_dir():
        return f"{shown}: unknown option for '{key}'; allowed: {', '.join(o for o in group_options(key))}"
    text = " ".join(str(c) for c in chain)
    if "not in struct" in text or ("Key '" in text and "not in" in text) or "Could not override" in text:
        return f"{shown}: unknown key '{key}' (see `tissuesim --cfg job` for the keys; use +{key}=... only for new keys)"
    return f"{shown}: {_one_line(exc)}"


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def preflight(argv: list[str]) -> None:
    """Compose and validate every configuration the command line asks for; raise ConfigError.

    For a sweep, each value of each swept key is checked with the other keys at their first
    value, so the cost grows with the number of values, not with the number of jobs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    overrides, multirun, skip = _split_argv(argv)
    if skip:
        return
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse override: {str(exc).splitlines()[0]}") from None

    base = []
    for ov in parsed:
        if ov.is_sweep_override():
            if not multirun:
                raise ConfigError(
                    f"{ov.input_line}: a list of values is a sweep; add -m (multirun) to run each value"
                )
            first = next(iter(ov.sweep_string_iterator()))
            base.append(f"{ov.get_key_element()}={first}")
        else:
            base.append(ov.input_line)

    variants = [(None, None, list(base))]
    for i, ov in enumerate(parsed):
        if ov.is_sweep_override():
            for v in ov.sweep_string_iterator():
                trial = list(base)
                trial[i] = f"{ov.get_key_element()}={v}"
                variants.append((ov, v, trial))

    for culprit, culprit_value, trial in variants:
        try:
            cfg = _compose(trial)
        except (HydraException, OmegaConfBaseException, ValueError, KeyError) as exc:
            bad = culprit
            if bad is None:
                bad = _find_culprit(parsed, trial)
            if bad is None:
                raise ConfigError(_one_line(exc)) from None
            raise ConfigError(_describe_override_error(bad, exc, culprit_value)) from None
        hydra_cfg = cfg.hydra
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            validate(cfg)
        except (OmegaConfBaseException, ValueError) as exc:
            where = f" (in the sweep {culprit.input_line})" if culprit is not None else ""
            raise ConfigError(str(exc).splitlines()[0] + where) from None
        if cfg.backend.name == "cupy":
            from tissuesim.backend import cupy_status

            ok, why = cupy_status()
            if not ok:
                raise ConfigError(f"backend=cupy: no usable GPU here ({why}); allowed here: numpy, auto")
        if not multirun:
            run_dir = Path(OmegaConf.select(hydra_cfg, "run.dir"))
            if (run_dir / "snapshots.h5").exists():
                raise ConfigError(
                    f"hydra.run.dir={run_dir}: already holds a run (snapshots.h5); runs are never overwritten, "
                    "choose a new directory"
                )


def _find_culprit(parsed, trial):
    """The override whose removal lets composition succeed (first such), else None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for i, ov in enumerate(parsed):
        try:
            _compose(trial[:i] + trial[i + 1 :])
        except (HydraException, OmegaConfBaseException, ValueError, KeyError):
            continue
        return ov
    return None


def _task(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tissuesim.backend import BackendError
    from tissuesim.runner import Interrupted, run_to_directory

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    job_num = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    try:
        validate(cfg)
        return run_to_directory(cfg, run_dir, job_num=job_num, overrides=list(hc.overrides.task))
    except (ConfigError, BackendError, FileExistsError, LookupError) as exc:
        log.error("%s", exc)
        print(f"tissuesim: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except Interrupted as exc:
        print(f"tissuesim: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _hydra_entry() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_task)()


def main() -> None:
    """``tissuesim`` console script."""
    try:
        preflight(sys.argv[1:])
    except ConfigError as exc:
        print(f"tissuesim: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    _hydra_entry()


def view_main(argv: list[str] | None = None) -> None:
    """``tissuesim-view RUN_DIR``: snapshot panels, timeseries figure and movie of a run."""
    import argparse

    from tissuesim.analysis.figures import render_run

    ap = argparse.ArgumentParser(prog="tissuesim-view", description=view_main.__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--field", default="il6", help="field shown beside the tissue (default il6)")
    ap.add_argument(
        "--z", default="mid", help="3D: z index of the slice, 'mid' (default) or 'max' projection"
    )
    ap.add_argument("--snapshots", default="all", help="'all', 'last' or indices like 0,5,-1")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/figures)")
    ap.add_argument("--no-movie", action="store_true")
    a = ap.parse_args(argv)
    z = a.z if a.z in ("mid", "max") else int(a.z)
    try:
        res = render_run(a.run_dir, a.field, z, a.out, a.snapshots, movie=not a.no_movie)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"tissuesim-view: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    print(f"{len(res['panels'])} panels, {res['timeseries']}" + (f", {res['movie']}" if res["movie"] else ""))


def report_main(argv: list[str] | None = None) -> None:
    """``tissuesim-report SWEEP_DIR``: one CSV of every job's readouts and overrides, and plots."""
    import argparse

    from tissuesim.analysis.report import write_report

    ap = argparse.ArgumentParser(prog="tissuesim-report", description=report_main.__doc__)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default SWEEP_DIR)")
    a = ap.parse_args(argv)
    try:
        res = write_report(a.sweep_dir, a.out)
    except (FileNotFoundError, OSError) as exc:
        print(f"tissuesim-report: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    print(f"{res['jobs']} jobs -> {res['csv']}, {res['png']}")


if __name__ == "__main__":
    main()
