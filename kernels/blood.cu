// The blood compartment's step on the device (tissuesim/biology/blood_device.py; its twin is
// biology.blood.Blood.advance with Immunology._move_blood for the exits, on the host).
//
// One thread does the whole system: ~20 float64 unknowns, four right-hand sides per step. It
// runs on the device so that the step needs no host work between the cells' exits and the next
// step's arrivals, and so the blood state comes back in the step's one device read.
//
// Every expression below is the one of Blood._rhs_list / advance / _detect_relapse, written in
// the same order with the same association (comparisons too, so NaN goes the host's way), and the
// file is compiled with --fmad=false: the results are those of the host bit for bit where libm
// agrees (built for the host with g++ they are, tests/biology/test_blood_device.py); on the GPU
// pow (the disease drive, every right-hand side) and exp (the tocilizumab blockade) may differ
// from glibc's by an ulp or two (CUDA documents pow to 2 ulp), and the results with them.
//
// Layouts (float64 unless said; nv = 7 + 4 P unknowns, P CAR products; see blood_device.py):
//   up  [nv + P + 7]   y (names order), growth per product, then day, toci_day (NaN: none),
//                      steroid_day (NaN: none), depleted, ab_nadir, relapse, treated
//   left i64 [ntypes]  cells of each type that left the patch into blood this step
//   prm [NPRM + nthr]  constants (indices P_* below), then the CRS grade thresholds, ascending
//   iprm int [4 + P + ntypes + n_fields]  P, ntypes, nthr, n_fields, target code per product (0
//                      CD19, 1 BCMA, 2 CD20, 3 other), blood pool per cell type (-2 B cells, -1
//                      none, k >= 0 the index of E_p; M_p at k + 1), then per field the index in y
//                      of its blood concentration (-1: none; blood.FIELD_IN_BLOOD)
//   out [2 nv + 8]     y after the exits (the state at the end of this step), y advanced by
//                      dt (the next step's), then day, toci_day, steroid_day, depleted,
//                      ab_nadir, relapse, CRS grade of the advanced step, events (1 tocilizumab,
//                      2 steroids given)
//   cb  [n_fields]     blood concentrations for the vessel exchange, from the state after the
//                      exits (autoantibody rel, IL-6 pg/mL, rituximab ug/mL, 0 otherwise), rounded through float32
//                      when cb_f32 (the fields' dtype, as the host path casts them)

typedef long long i64;

#define MAXV 64  // unknowns: 7 + 4 P <= 64, so at most 14 CAR products (checked on the host)

enum {
    P_KILL = 0,        // kill_per_car_t_per_ul_per_day
    P_KD,              // antigen_kd_per_ul
    P_KANTI,           // anti_car_kill_per_day
    P_MF,              // memory_fraction
    P_EXH,             // exhaustion_days
    P_KRK,             // rituximab_kill_per_day
    P_EC50,            // rituximab_ec50_ug_per_ml
    P_TAUB,            // b_cell_lifespan_days
    P_B0N,             // b_cell_per_ul - autoreactive_b_cell_per_ul
    P_A0,              // autoreactive_b_cell_per_ul
    P_PB0,             // plasmablast_per_ul
    P_PC0,             // plasma_cell_per_ul
    P_GAUTO,           // autoreactive_b_cell_growth_per_day
    P_NICHE,           // autoreactive_niche_access
    P_NICHE_RTX,       // rituximab_niche_access
    P_TPB,             // plasmablast_lifespan_days
    P_TPC,             // plasma_cell_lifespan_days
    P_PHI,             // long_lived_antibody_fraction
    P_STEROID,         // steroid_il6_reduction
    P_IL6_0,           // il6_baseline_pg_per_ml
    P_S6,              // il6_pg_per_ml_per_killed_cell_per_ul
    P_RHO,             // ln 2 / car_t_doubling_days
    P_DE,              // ln 2 / effector_half_life_days
    P_DM,              // ln 2 / memory_half_life_days
    P_KG,              // ln 2 / igg_half_life_days
    P_K6,              // ln 2 / (il6_half_life_hours / 24)
    P_KRTX,            // ln 2 / rituximab_half_life_days
    P_HDRIVE,          // disease_drive_hill
    P_KDRIVE,          // disease_drive_half_rel ** hill
    P_EXTINCT,         // extinction_per_ul
    P_TOCI_BLOCK,      // tocilizumab_blockade
    P_KTOCI,           // ln 2 / tocilizumab_half_life_days
    P_B0,              // b_cell_per_ul
    P_RELAPSE_B,       // relapse_b_cell_fraction
    P_RELAPSE_AB,      // relapse_autoantibody_rise
    P_USES_TOCI,       // 1 if CRS management includes tocilizumab
    P_USES_STEROIDS,   // 1 if it includes steroids
    P_PER_UL_PER_CELL, // blood cells/uL per patch cell
    NPRM
};

__device__ __forceinline__ double max0(double x) { return x > 0.0 ? x : 0.0; }  // Python max(0.0, x)

// dy/dt (per day) at y: Blood._rhs_list, expression by expression.
__device__ void blood_rhs(const double* y, double* d, const double* prm, const int* code, const double* growth,
                          int np, double steroid) {
    const double k = prm[P_KILL], kd = prm[P_KD], k_anti = prm[P_KANTI], mf = prm[P_MF], exh = prm[P_EXH];
    const double rho = prm[P_RHO], d_e = prm[P_DE], d_m = prm[P_DM];
    const double bn = y[0], ba = y[1], pb = y[2], pc = y[3], ab = y[4], il6 = y[5], rtx = y[6];
    double kill_cd19 = 0.0, kill_bcma = 0.0;
    for (int p = 0; p < np; ++p) {
        const int i = 7 + 4 * p;
        const double e = y[i], m = y[i + 1], r = y[i + 2], x = y[i + 3];
        double ag;
        if (code[p] == 0) ag = bn + ba + pb;
        else if (code[p] == 1) ag = pb + pc;
        else if (code[p] == 2) ag = bn + ba;
        else ag = 0.0;
        const double f = ag / (ag + kd);
        const double g = x * f;
        const double rej = k_anti * r;
        d[i] = rho * g * (e + m) - d_e * (1.0 - g) * e - rej * e;
        d[i + 1] = mf * d_e * (1.0 - g) * e - d_m * m - rej * m;
        d[i + 3] = e + m > 0.0 ? -x * f / exh : 0.0;
        d[i + 2] = growth[p] * r * (1.0 - r);
        const double t = e + m;
        if (code[p] == 0) kill_cd19 += k * t;
        else if (code[p] == 1) kill_bcma += k * t;
    }
    const double k_rtx = rtx > 0.0 ? prm[P_KRK] * rtx / (rtx + prm[P_EC50]) : 0.0;
    d[0] = (prm[P_B0N] - bn) / prm[P_TAUB] - (kill_cd19 + k_rtx) * bn;
    double drive = 0.0;
    if (!(ab <= 0.0)) {  // the host's "if ab <= 0: 0" (NaN goes on to pow, as there)
        const double a = pow(ab, prm[P_HDRIVE]);
        const double one_k = 1.0 + prm[P_KDRIVE];
        drive = a * one_k / (a + prm[P_KDRIVE]);
    }
    const double a0 = prm[P_A0], pb0 = prm[P_PB0], pc0 = prm[P_PC0], tpb = prm[P_TPB], tpc = prm[P_TPC];
    d[1] = prm[P_GAUTO] * drive * ba * (1.0 - ba / a0) - (prm[P_NICHE] * kill_cd19 + prm[P_NICHE_RTX] * k_rtx) * ba;
    d[2] = (pb0 * drive * ba / a0 - pb) / tpb - (kill_cd19 + kill_bcma) * pb;
    const double pc0_tpc = pc0 / tpc;
    d[3] = pc0_tpc * pb / pb0 - pc / tpc - kill_bcma * pc;
    const double phi = prm[P_PHI], one_phi = 1.0 - phi, k_g = prm[P_KG];
    d[4] = k_g * (one_phi * pb / pb0 + phi * pc / pc0) - k_g * ab;
    const double one_steroid = 1.0 - steroid;
    // antigen+ cells killed by CAR-T per uL per day (the kill terms above, without rituximab's)
    const double killed = kill_cd19 * bn + prm[P_NICHE] * kill_cd19 * ba + (kill_cd19 + kill_bcma) * pb + kill_bcma * pc;
    d[5] = prm[P_K6] * (prm[P_IL6_0] - il6) + prm[P_S6] * one_steroid * killed;
    d[6] = -prm[P_KRTX] * rtx;
}

// One step of the blood compartment. Launch with one thread (grid 1, block 1).
extern "C" __global__ void blood_step(const double* __restrict__ up, const i64* __restrict__ left,
                                      const double* __restrict__ prm, const int* __restrict__ iprm, double dt_min,
                                      int apply_exits, int cb_f32, double* __restrict__ out,
                                      double* __restrict__ cb) {
    if (blockIdx.x * blockDim.x + threadIdx.x != 0) return;
    const int np = iprm[0], ntypes = iprm[1], nthr = iprm[2], nf = iprm[3];
    const int* code = iprm + 4;
    const int* pool = iprm + 4 + np;
    const int* from_blood = pool + ntypes;
    const int nv = 7 + 4 * np;
    const double* growth = up + nv;
    const double* meta = up + nv + np;
    double y[MAXV];
    for (int i = 0; i < nv; ++i) y[i] = up[i];

    // Exits into blood, type by type in type order (Immunology._move_blood, Blood.exchange).
    if (apply_exits) {
        const double per = prm[P_PER_UL_PER_CELL];
        for (int ti = 0; ti < ntypes; ++ti) {
            const i64 c = left[ti];
            if (c == 0 || pool[ti] == -1) continue;
            const double dlt = (double)c * per;
            if (pool[ti] == -2) {
                const double tot = y[0] + y[1];
                if (tot > 0.0) {
                    const double fa = y[1] / tot;
                    y[1] = max0(y[1] + dlt * fa);
                    y[0] = max0(y[0] + dlt * (1.0 - fa));
                } else if (dlt > 0.0) {
                    y[0] = max0(y[0] + dlt);
                }
            } else {
                // a CAR product: E_p at k, M_p at k + 1. Cells out of blood come out of both
                // pools in proportion, as arrivals are drawn from both (Blood.move)
                const int k = pool[ti];
                const double tot = y[k] + y[k + 1];
                if (dlt < 0.0 && tot > 0.0) {
                    const double fm = y[k + 1] / tot;
                    y[k + 1] = max0(y[k + 1] + dlt * fm);
                    y[k] = max0(y[k] + dlt * (1.0 - fm));
                } else {
                    y[k] = max0(y[k] + dlt);
                }
            }
        }
    }
    for (int i = 0; i < nv; ++i) out[i] = y[i];
    for (int i = 0; i < nf; ++i) {
        const double c = from_blood[i] >= 0 ? y[from_blood[i]] : 0.0;
        cb[i] = cb_f32 ? (double)(float)c : c;
    }

    // RK4 over dt (Blood.advance).
    double day = meta[0], toci_day = meta[1], steroid_day = meta[2];
    double depleted = meta[3], ab_nadir = meta[4], relapse = meta[5];
    const double treated = meta[6];
    const double steroid = steroid_day != steroid_day ? 0.0 : prm[P_STEROID];  // NaN: not given
    const double h = dt_min / 1440.0;
    const double hh = 0.5 * h;
    double k1[MAXV], k2[MAXV], k3[MAXV], k4[MAXV], tmp[MAXV];
    blood_rhs(y, k1, prm, code, growth, np, steroid);
    for (int i = 0; i < nv; ++i) tmp[i] = y[i] + hh * k1[i];
    blood_rhs(tmp, k2, prm, code, growth, np, steroid);
    for (int i = 0; i < nv; ++i) tmp[i] = y[i] + hh * k2[i];
    blood_rhs(tmp, k3, prm, code, growth, np, steroid);
    for (int i = 0; i < nv; ++i) tmp[i] = y[i] + h * k3[i];
    blood_rhs(tmp, k4, prm, code, growth, np, steroid);
    const double h6 = h / 6.0;
    for (int i = 0; i < nv; ++i) y[i] = max0(y[i] + h6 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]));
    if (y[1] < prm[P_EXTINCT]) y[1] = 0.0;  // fewer than one cell in the body: the clone is gone
    day += h;

    // CRS grade before management (Blood.crs_grade: thresholds reached by the effective IL-6).
    const double block = toci_day != toci_day ? 0.0 : prm[P_TOCI_BLOCK] * exp(-prm[P_KTOCI] * (day - toci_day));
    const double il6_eff = y[5] * (1.0 - block);
    int grade = 0;
    // bisect_right: the thresholds not above the value (all of them for NaN, as Python's bisect)
    for (int j = 0; j < nthr; ++j) grade += !(il6_eff < prm[NPRM + j]);
    int events = 0;
    if (grade >= 2) {
        if (prm[P_USES_TOCI] != 0.0 && toci_day != toci_day) {
            toci_day = day;
            events |= 1;
        }
        if (prm[P_USES_STEROIDS] != 0.0 && steroid_day != steroid_day) {
            steroid_day = day;
            events |= 2;
        }
    }
    // Relapse detector (Blood._detect_relapse).
    if (treated != 0.0 && relapse == 0.0) {
        const double b = y[0] + y[1];
        if (b < 0.05 * prm[P_B0]) depleted = 1.0;
        ab_nadir = y[4] < ab_nadir ? y[4] : ab_nadir;
        if (depleted != 0.0 && b > prm[P_RELAPSE_B] * prm[P_B0] && y[4] > (1.0 + prm[P_RELAPSE_AB]) * ab_nadir)
            relapse = 1.0;
    }
    for (int i = 0; i < nv; ++i) out[nv + i] = y[i];
    double* o = out + 2 * nv;
    o[0] = day;
    o[1] = toci_day;
    o[2] = steroid_day;
    o[3] = depleted;
    o[4] = ab_nadir;
    o[5] = relapse;
    o[6] = (double)grade;
    o[7] = (double)events;
}
