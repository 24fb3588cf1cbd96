// heavy-c: a policy that is slow to compile on purpose, for the hostile test
// "a compile-heavy component published while calls flow". Ten thousand small
// distinct functions reached through a table: nothing to pick well, only
// machine code for the host's compiler to make. It picks round-robin.
//
// Built by `make policies` like least-conn-c (see there).

#include "balancer.h"

#define F(n) \
    static uint64_t f##n(uint64_t x) { return (x * (2 * (n) + 1)) ^ (x >> ((n) % 13 + 1)) ^ (n); }
#define F10(n) F(n##0) F(n##1) F(n##2) F(n##3) F(n##4) F(n##5) F(n##6) F(n##7) F(n##8) F(n##9)
#define F100(n) F10(n##0) F10(n##1) F10(n##2) F10(n##3) F10(n##4) F10(n##5) F10(n##6) F10(n##7) F10(n##8) F10(n##9)
#define F1000(n) F100(n##0) F100(n##1) F100(n##2) F100(n##3) F100(n##4) F100(n##5) F100(n##6) F100(n##7) F100(n##8) F100(n##9)
F1000(1) F1000(2) F1000(3) F1000(4) F1000(5) F1000(6) F1000(7) F1000(8) F1000(9)

#define P(n) f##n,
#define P10(n) P(n##0) P(n##1) P(n##2) P(n##3) P(n##4) P(n##5) P(n##6) P(n##7) P(n##8) P(n##9)
#define P100(n) P10(n##0) P10(n##1) P10(n##2) P10(n##3) P10(n##4) P10(n##5) P10(n##6) P10(n##7) P10(n##8) P10(n##9)
#define P1000(n) P100(n##0) P100(n##1) P100(n##2) P100(n##3) P100(n##4) P100(n##5) P100(n##6) P100(n##7) P100(n##8) P100(n##9)

typedef uint64_t (*step_t)(uint64_t);
static step_t const STEPS[] = {P1000(1) P1000(2) P1000(3) P1000(4) P1000(5) P1000(6) P1000(7) P1000(8) P1000(9)};
#define NSTEPS (sizeof STEPS / sizeof STEPS[0])

static uint32_t next;

bool exports_balancer_pick(uint32_t n, uint64_t generation, uint64_t r, uint32_t *ret, balancer_string_t *err) {
    (void)generation;
    if (n == 0) {
        balancer_string_dup(err, "no candidates");
        return false;
    }
    // One table step per pick keeps every function reachable.
    (void)STEPS[r % NSTEPS](r);
    *ret = next++ % n;
    return true;
}
