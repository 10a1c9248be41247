"""Thin Python binding of moe-operator's expert-parallel MoE layer (libmoe_ep.so, capi/).

    layer = MoeEp({"rank": 0, "world": 2, "rendezvous": "127.0.0.1:29600", "transport": "ipc",
                   "device": 0, "plan": "plan.json", "checkpoint": "ckpt/"})
    layer.begin_step()                       # once per model forward
    out = layer.forward(layer_idx, hidden, topk_ids, topk_weights)

Tensors are CUDA tensors on the session's device: hidden [tokens, H] bf16, topk_ids
[tokens, k] int64, topk_weights [tokens, k] float32 (converted here if not). The call waits for
PyTorch's current stream, runs dispatch, experts and combine on the library's stream and returns
with `out` written. The library is found at $MOE_EP_LIB, or next to this file.
"""

import ctypes
import json
import os

import torch

_lib = None


def _load():
    global _lib
    if _lib is None:
        path = os.environ.get("MOE_EP_LIB") or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "libmoe_ep.so")
        lib = ctypes.CDLL(path)
        lib.moe_ep_last_error.restype = ctypes.c_char_p
        lib.moe_ep_create.restype = ctypes.c_void_p
        lib.moe_ep_create.argtypes = [ctypes.c_char_p]
        lib.moe_ep_destroy.argtypes = [ctypes.c_void_p]
        lib.moe_ep_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                    ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)]
        lib.moe_ep_begin_step.argtypes = [ctypes.c_void_p]
        lib.moe_ep_stage_plan.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
        lib.moe_ep_forward.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64,
                                       ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64,
                                       ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p]
        _lib = lib
    return _lib


class MoeEpError(RuntimeError):
    pass


def _check(rc):
    if rc != 0:
        raise MoeEpError(_load().moe_ep_last_error().decode("utf-8", "replace"))


class MoeEp:
    def __init__(self, config):
        lib = _load()
        self._h = lib.moe_ep_create(json.dumps(config).encode())
        if not self._h:
            raise MoeEpError(lib.moe_ep_last_error().decode("utf-8", "replace"))
        r, w, h = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint64()
        _check(lib.moe_ep_info(self._h, ctypes.byref(r), ctypes.byref(w), ctypes.byref(h)))
        self.rank, self.world, self.hidden = r.value, w.value, h.value

    def begin_step(self):
        _check(_load().moe_ep_begin_step(self._h))

    def stage_plan(self, path, epoch):
        _check(_load().moe_ep_stage_plan(self._h, str(path).encode(), epoch))

    def forward(self, layer, hidden, topk_ids, topk_weights, out=None):
        tokens, h = hidden.shape
        if h != self.hidden:
            raise MoeEpError(f"hidden size {h}, the session's is {self.hidden}")
        if hidden.dtype != torch.bfloat16 or not hidden.is_cuda:
            raise MoeEpError("hidden must be a CUDA bfloat16 tensor")
        hidden = hidden.contiguous()
        ids = topk_ids.to(torch.int64).contiguous()
        w = topk_weights.to(torch.float32).contiguous()
        if ids.shape != w.shape or ids.shape[0] != tokens:
            raise MoeEpError(f"top-k ids {tuple(ids.shape)} and weights {tuple(w.shape)} for {tokens} tokens")
        if out is None:
            out = torch.empty_like(hidden)
        stream = torch.cuda.current_stream(hidden.device).cuda_stream
        _check(_load().moe_ep_forward(self._h, layer, tokens, ids.shape[1], hidden.data_ptr(),
                                      ids.data_ptr(), w.data_ptr(), out.data_ptr(),
                                      ctypes.c_void_p(stream)))
        return out

    def close(self):
        if self._h:
            _load().moe_ep_destroy(self._h)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
