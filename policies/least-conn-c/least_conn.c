// least-conn-c: the least-conn policy written in C, to show a policy in a
// language other than Rust and to measure it beside the Rust one
// (`make bench-pick`). Same algorithm as policies/least-conn: fewest calls in
// flight per unit of weight; every candidate compared up to SCAN_ALL, the
// power of two choices above that.
//
// Built by `make policies`: weir-wit-c writes the bindings (balancer.h/.c)
// from wit/, clang compiles for wasm32 against wasi-libc (for malloc only:
// the module imports nothing but weir:policy), and weir-wit-c turns the
// core module into a component. See docs/writing-a-policy.md.

#include "balancer.h"

// Up to this many candidates, all are compared.
#define SCAN_ALL 4

typedef weir_policy_backends_load_t load_t;

static load_t load_of(uint32_t i) {
    load_t load;
    weir_policy_backends_load_of(i, &load);
    return load;
}

// Calls in flight per unit of weight, compared without division. Idle
// candidates tie, and ties keep the first (randomly placed) one.
static bool lighter(const load_t *a, const load_t *b) {
    uint64_t wa = a->weight ? a->weight : 1, wb = b->weight ? b->weight : 1;
    return (uint64_t)a->active_requests * wb <= (uint64_t)b->active_requests * wa;
}

static void set_error(balancer_string_t *err, const char *message) {
    // The bindings free the error string after the call: it must be allocated.
    balancer_string_dup(err, message);
}

bool exports_balancer_pick(uint32_t n, uint64_t generation, uint64_t r, uint32_t *ret, balancer_string_t *err) {
    (void)generation;
    if (n == 0) {
        set_error(err, "no candidates");
        return false;
    }
    if (n <= SCAN_ALL) {
        // Start at a random candidate so ties spread instead of piling on 0.
        uint32_t start = (uint32_t)(r % n);
        uint32_t best = start;
        load_t best_load = load_of(start);
        for (uint32_t step = 1; step < n; step++) {
            uint32_t i = (start + step) % n;
            load_t load = load_of(i);
            if (!lighter(&best_load, &load)) {
                best = i;
                best_load = load;
            }
        }
        *ret = best;
        return true;
    }
    uint32_t a = (uint32_t)(r % n);
    // A second, different candidate from the high bits.
    uint32_t b = (a + 1 + (uint32_t)((r >> 32) % (n - 1))) % n;
    load_t la = load_of(a), lb = load_of(b);
    *ret = lighter(&la, &lb) ? a : b;
    return true;
}
