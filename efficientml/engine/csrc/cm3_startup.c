/* efficientml engine: minimal Cortex-M startup and semihosting for running a generated model under
 * QEMU (mps2-an385): vector table, .data copy, .bss zeroing, then main(); output and exit go
 * through ARM semihosting (bkpt 0xAB), so no UART driver and no newlib I/O are needed. */
#include <stdint.h>

extern uint32_t _data_start, _data_end, _data_load, _bss_start, _bss_end, _stack_top;
int main(void);

static int eml_semihost(int op, const void *arg) {
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void eml_print(const char *s) { eml_semihost(0x04, s); }   /* SYS_WRITE0 */

void eml_exit(int status) {                                /* SYS_EXIT: application exit or error */
    for (;;) eml_semihost(0x18, (const void *)(uintptr_t)(status == 0 ? 0x20026 : 0x20023));
}

void eml_reset(void) {
    uint32_t *src = &_data_load, *dst = &_data_start;
    while (dst < &_data_end) *dst++ = *src++;
    for (dst = &_bss_start; dst < &_bss_end;) *dst++ = 0;
    eml_exit(main());
}

static void eml_fault(void) { eml_print("fault\n"); eml_exit(1); }

__attribute__((section(".vectors"), used))
static const void *eml_vectors[16] = {
    &_stack_top, (void *)eml_reset, (void *)eml_fault, (void *)eml_fault, (void *)eml_fault,
    (void *)eml_fault, (void *)eml_fault, 0, 0, 0, 0, (void *)eml_fault, (void *)eml_fault, 0,
    (void *)eml_fault, (void *)eml_fault,
};
