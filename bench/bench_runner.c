/* bench_runner.c: times ek_model_invoke() of a generated project.
 * Build it with the project's sources; prints nanoseconds per inference.
 * usage: bench_runner ITERATIONS [cpu]   (ITERATIONS >= 1; one extra warm-up call; "cpu": the thread's
 * CPU time instead of the wall clock, which on a loaded machine leaves out the time others ran) */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model.h"

int main(int argc, char **argv)
{
    const long iterations = argc > 1 ? atol(argv[1]) : 1000;
    if (iterations < 1) {
        fprintf(stderr, "usage: %s ITERATIONS\n", argv[0]);
        return 2;
    }
    uint32_t state = 12345u; /* the same pseudo-random input every run */
    for (int32_t i = 0; i < EK_MODEL_NUM_INPUTS; ++i) {
        ek_model_elem *in = ek_model_input(i);
        for (int32_t k = 0; k < ek_model_input_size(i); ++k) {
            state = state * 1664525u + 1013904223u;
            in[k] = (ek_model_elem)(int8_t)(state >> 24);
        }
    }
    ek_model_invoke(); /* warm-up: caches, page faults */
    const clockid_t which = argc > 2 && strcmp(argv[2], "cpu") == 0 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC;
    struct timespec t0, t1;
    clock_gettime(which, &t0);
    for (long n = 0; n < iterations; ++n) {
        ek_model_invoke();
    }
    clock_gettime(which, &t1);
    long checksum = 0;
    for (int32_t k = 0; k < ek_model_output_size(0); ++k) {
        checksum += (long)ek_model_output(0)[k];
    }
    const double ns = ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / (double)iterations;
    printf("%.1f %ld\n", ns, checksum);
    return 0;
}
