/* libFuzzer harness for the device side of edgekit's serial protocol (runtime/ek_protocol.c),
 * linked with a real generated model. Two ways in, chosen by the first byte:
 *   even: the bytes arrive on the wire one by one (COBS framing, CRC checks, error frames);
 *   odd:  the bytes are a decoded frame; the harness appends the right CRC so the fuzzer reaches
 *         every message handler (bounds checks of SET_INPUT, GET_OUTPUT, LAYER_COUNTS, ...).
 * Any out-of-bounds access or undefined behaviour aborts under ASan / UBSan. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ek_protocol.h"

static ek_receiver receiver;
static uint8_t frame[EK_FRAME_MAX + 8];
static uint8_t response[EK_FRAME_MAX];

static void check_response(uint32_t length)
{
    if (length < 6 || length > EK_FRAME_MAX) {
        abort();
    }
    const uint32_t crc = (uint32_t)response[length - 4] | ((uint32_t)response[length - 3] << 8) |
                         ((uint32_t)response[length - 2] << 16) | ((uint32_t)response[length - 1] << 24);
    if (crc != ek_crc32(response, length - 4)) {
        abort(); /* every response the device sends must carry a valid CRC */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) {
        return 0;
    }
    if ((data[0] & 1u) == 0u) {
        memset(&receiver, 0, sizeof(receiver));
        for (size_t i = 1; i < size; ++i) {
            const int32_t n = ek_receive_byte(&receiver, data[i], frame);
            if (n > 0) {
                check_response(ek_protocol_handle(frame, (uint32_t)n, response));
            } else if (n < 0) {
                check_response(ek_protocol_framing_error(response));
            }
        }
        return 0;
    }
    const size_t body = size - 1 > EK_FRAME_MAX - 4 ? EK_FRAME_MAX - 4 : size - 1;
    memcpy(frame, data + 1, body);
    const uint32_t crc = ek_crc32(frame, (uint32_t)body);
    memcpy(frame + body, &crc, 4); /* little-endian hosts */
    check_response(ek_protocol_handle(frame, (uint32_t)body + 4, response));
    return 0;
}
