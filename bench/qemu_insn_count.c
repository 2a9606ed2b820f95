/* qemu_insn_count.c: a QEMU TCG plugin counting executed guest instructions per guest thread.
 *
 * Under qemu-user every guest thread is a vCPU of its own (index 0: the main thread, then the
 * threads in the order they were created), so the counts are per thread. At exit the plugin
 * prints one line to QEMU's log (stderr): "insns T0 T1 ...". A translation block counts its
 * instructions when it starts executing (QEMU's own "bb" plugin does the same); a block left
 * early by a fault would be over-counted, which does not happen in these benchmarks.
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
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
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
void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAX_THREADS 64
/* One counter per vCPU on its own cache line: each is only written by its own host thread. */
static struct {
    uint64_t n;
    char pad[56];
} counts[MAX_THREADS];
static volatile unsigned int highest;

static void on_exec(unsigned int vcpu, void *udata)
{
    if (vcpu < MAX_THREADS) {
        counts[vcpu].n += (uint64_t)(uintptr_t)udata;
        if (vcpu > highest) {
            highest = vcpu;
        }
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS,
                                         (void *)(uintptr_t)qemu_plugin_tb_n_insns(tb));
}

static void report_at_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    char line[32 + MAX_THREADS * 24] = "insns";
    for (unsigned int i = 0; i <= highest && i < MAX_THREADS; ++i) {
        snprintf(line + strlen(line), sizeof line - strlen(line), " %" PRIu64, counts[i].n);
    }
    strcat(line, "\n");
    qemu_plugin_outs(line);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    (void)argc;
    (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, report_at_exit, NULL);
    return 0;
}
