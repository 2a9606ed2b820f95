/* qemu_insn_count.c: a QEMU TCG plugin counting executed guest instructions per guest thread.
 *
 * Under qemu-user every guest thread is a vCPU of its own (index 0: the main thread, then the
 * threads in the order they were created), so the counts are per thread. At exit the plugin
 * prints one line to QEMU's log (stderr): "insns T0 T1 ...". A translation block counts its
 * instructions when it starts executing (QEMU's own "bb" plugin does the same); a block left
 * early by a fault would be over-counted, which does not happen in these benchmarks.
 *
 * With the arguments start=ADDR,stop=ADDR (guest addresses of two instructions, e.g. a function's
 * entry and its ret) the plugin also counts, per thread, the instructions executed from each
 * execution of the start instruction to the next execution of the stop one (both included) and
 * prints them at exit as "windows N1 N2 ..." (in the order the windows closed, at most 256): that is
 * how bench/litert_aarch64.py counts one tflite::Subgraph::Invoke() without the Python around it.
 * Only the translation blocks holding one of the two instructions are counted per instruction.
 *
 * With the argument pcs=FILE the plugin counts every instruction by its guest address instead and writes
 * "ADDRESS COUNT" lines (hex, decimal) to FILE at exit: bench/profile_pi.py turns them into instructions
 * per function and per instruction (slower: one callback per instruction).
 *
 * Debian's qemu packages ship no qemu-plugin.h, so the few declarations of the plugin API
 * (version 1, QEMU 7.2; the symbols qemu-aarch64 exports) are written out here.
 *
 *   gcc -shared -fPIC -O2 -o qemu_insn_count.so bench/qemu_insn_count.c
 *   qemu-aarch64 -plugin ./qemu_insn_count.so -d plugin -D counts.txt ... PROGRAM
 */
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct qemu_info_t qemu_info_t; /* not read */
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_udata_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAX_THREADS 64
/* One counter per vCPU on its own cache line: each is only written by its own host thread. */
static struct {
    uint64_t n;
    uint64_t window; /* instructions in the open window */
    int active;      /* inside a start..stop window */
    char pad[44];
} counts[MAX_THREADS];
static volatile unsigned int highest;

#define MAX_WINDOWS 256
static uint64_t start_addr, stop_addr; /* 0: no windows */
static uint64_t windows[MAX_WINDOWS];
static unsigned int n_windows;
static int windows_lock; /* windows[] is appended to from any thread */

static void on_exec(unsigned int vcpu, void *udata)
{
    if (vcpu < MAX_THREADS) {
        counts[vcpu].n += (uint64_t)(uintptr_t)udata;
        if (vcpu > highest) {
            highest = vcpu;
        }
    }
}

static void on_exec_windowed(unsigned int vcpu, void *udata)
{
    on_exec(vcpu, udata);
    if (vcpu < MAX_THREADS && counts[vcpu].active) {
        counts[vcpu].window += (uint64_t)(uintptr_t)udata;
    }
}

enum { PLAIN = 1, START = 2, STOP = 3 }; /* udata of the per-instruction callbacks */

static void on_insn(unsigned int vcpu, void *udata)
{
    const uintptr_t kind = (uintptr_t)udata;
    if (vcpu >= MAX_THREADS) {
        return;
    }
    if (vcpu > highest) {
        highest = vcpu;
    }
    counts[vcpu].n += 1;
    if (kind == START) {
        counts[vcpu].active = 1;
        counts[vcpu].window = 0;
    }
    counts[vcpu].window += (uint64_t)counts[vcpu].active;
    if (kind == STOP && counts[vcpu].active) {
        counts[vcpu].active = 0;
        while (__atomic_exchange_n(&windows_lock, 1, __ATOMIC_ACQUIRE)) {
        }
        if (n_windows < MAX_WINDOWS) {
            windows[n_windows++] = counts[vcpu].window;
        }
        __atomic_store_n(&windows_lock, 0, __ATOMIC_RELEASE);
    }
}

/* pcs=FILE: per-address counts in an open-addressed table (the slot of an address is fixed when its
 * block is translated, under a spin lock; counts are added atomically from any thread). */
#define PC_SLOTS (1u << 20)
static const char *pcs_path;
static uint64_t pc_keys[PC_SLOTS], pc_counts[PC_SLOTS];
static int pc_lock;

static void on_insn_pc(unsigned int vcpu, void *udata)
{
    (void)vcpu;
    __atomic_add_fetch(&pc_counts[(uintptr_t)udata], 1, __ATOMIC_RELAXED);
}

static void translate_pcs(struct qemu_plugin_tb *tb)
{
    const size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; ++i) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        const uint64_t a = qemu_plugin_insn_vaddr(insn);
        while (__atomic_exchange_n(&pc_lock, 1, __ATOMIC_ACQUIRE)) {
        }
        uint32_t h = (uint32_t)((a >> 2) * 2654435761u) & (PC_SLOTS - 1);
        while (pc_keys[h] != 0 && pc_keys[h] != a) {
            h = (h + 1) & (PC_SLOTS - 1);
        }
        pc_keys[h] = a;
        __atomic_store_n(&pc_lock, 0, __ATOMIC_RELEASE);
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_insn_pc, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)h);
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    if (pcs_path) {
        translate_pcs(tb);
        return;
    }
    (void)id;
    const size_t n = qemu_plugin_tb_n_insns(tb);
    int marked = 0;
    for (size_t i = 0; start_addr && i < n; ++i) {
        const uint64_t a = qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, i));
        marked |= a == start_addr || a == stop_addr;
    }
    if (!marked) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, start_addr ? on_exec_windowed : on_exec, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)n);
        return;
    }
    for (size_t i = 0; i < n; ++i) { /* the block with the start or the stop: one instruction at a time */
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        const uint64_t a = qemu_plugin_insn_vaddr(insn);
        const uintptr_t kind = a == start_addr ? START : a == stop_addr ? STOP : PLAIN;
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_insn, QEMU_PLUGIN_CB_NO_REGS, (void *)kind);
    }
}

static void report_at_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    if (pcs_path) {
        FILE *f = fopen(pcs_path, "w");
        if (f == NULL) {
            qemu_plugin_outs("qemu_insn_count: cannot write the pcs file\n");
            return;
        }
        for (uint32_t h = 0; h < PC_SLOTS; ++h) {
            if (pc_keys[h] != 0 && pc_counts[h] != 0) {
                fprintf(f, "%" PRIx64 " %" PRIu64 "\n", pc_keys[h], pc_counts[h]);
            }
        }
        fclose(f);
        return;
    }
    char line[32 + MAX_THREADS * 24] = "insns";
    for (unsigned int i = 0; i <= highest && i < MAX_THREADS; ++i) {
        snprintf(line + strlen(line), sizeof line - strlen(line), " %" PRIu64, counts[i].n);
    }
    strcat(line, "\n");
    qemu_plugin_outs(line);
    if (start_addr) {
        char w[32 + MAX_WINDOWS * 24] = "windows";
        for (unsigned int i = 0; i < n_windows; ++i) {
            snprintf(w + strlen(w), sizeof w - strlen(w), " %" PRIu64, windows[i]);
        }
        strcat(w, "\n");
        qemu_plugin_outs(w);
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; ++i) {
        if (strncmp(argv[i], "start=", 6) == 0) {
            start_addr = strtoull(argv[i] + 6, NULL, 0);
        } else if (strncmp(argv[i], "stop=", 5) == 0) {
            stop_addr = strtoull(argv[i] + 5, NULL, 0);
        } else if (strncmp(argv[i], "pcs=", 4) == 0) {
            pcs_path = strdup(argv[i] + 4); /* argv is not ours to keep */
        } else {
            return -1; /* an argument this plugin does not know */
        }
    }
    if ((start_addr == 0) != (stop_addr == 0)) {
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, report_at_exit, NULL);
    return 0;
}
