/* moe-operator's expert-parallel MoE layer: C ABI of libmoe_ep.so (see docs/data-plane.md).
 * Every int-returning call gives 0 on success, -1 on failure with the reason in
 * moe_ep_last_error() (thread-local). */
#ifndef MOE_EP_H
#define MOE_EP_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

const char *moe_ep_last_error(void);
/* Joins the group; config_json: {"rank", "world", "rendezvous": "host:port", "transport":
 * "ipc"|"nccl", "device", "plan": path, "epoch", "checkpoint": dir | "synthetic_weights": seed,
 * "listen", "rendezvous_timeout_s", "step_timeout_s", "micro_batches": 1|2}. NULL on failure. */
void *moe_ep_create(const char *config_json);
void moe_ep_destroy(void *h);
int moe_ep_info(void *h, uint32_t *rank, uint32_t *world, uint64_t *hidden);
int moe_ep_begin_step(void *h);
int moe_ep_stage_plan(void *h, const char *plan_path, uint64_t epoch);
/* x, out: tokens x hidden bf16; topk_ids: tokens x top_k int64; topk_weights: tokens x top_k
 * float32; device pointers; stream: the caller's CUstream (NULL: legacy default stream). */
int moe_ep_forward(void *h, uint32_t layer, uint64_t tokens, uint32_t top_k, uint64_t x,
                   uint64_t topk_ids, uint64_t topk_weights, uint64_t out, void *stream);

#ifdef __cplusplus
}
#endif
#endif
