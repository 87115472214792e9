"""Mistral on a paged KV cache: flattened tokens, fused projections, pluggable attention, LoRA hooks.

Tokens of all sequences are flattened to [T]; `cu_seqlen_prefill` is None in decode (one token per
sequence). Every LoRA-targetable projection group calls `pending = adapter_data.begin_lora(layer_idx,
group, x, widths)` before its base matmul and `delta = pending.finish(out)` after it (after the all-reduce
for row-parallel ones), `out` being the fused output of the group (q|k|v, gate|up) with its members' column
widths: the adapter either adds every member's delta to out in place (delta None) or returns it for out's
consumer to add, fused into the kernel that reads out next (rope + KV write, silu_and_mul, the next
RMSNorm), so that its work can run beside the base matmul (model/adapters/batch.py; the contract:
model/lora_hook.py). lm_head calls `add_lora(-1, "lm_head", hidden, logits)` after its matmul. One decode
row without LoRA on Hopper takes the batch-1 route instead (model/layers/gemv.py, deferred.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.attention import AttentionBackend, Seqlen, select_attention_backend
from model.attention.kv import LayerKV
from model.config import MistralConfig
from model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from model.layers.deferred import NormedRow, SiluMulRow
from model.layers.fused import FusedOps
from model.layers.gemv import GemvRouter, router_supported
from model.lora_hook import AdapterHook, begin_lora, has_lora, lora_output
from model.parallel import TPGroup


@dataclass
class StepInputs:
    """What every layer needs from one forward call (built per call: no module-global context)."""

    is_prefill: bool
    block_tables: torch.Tensor | None  # [B, max_blocks] int32
    slots: torch.Tensor | None  # [T] (or [len(prefill_cache_indices)]) int64; -1: no write
    seqlen: Seqlen
    max_s: int
    adapter_data: AdapterHook | None
    prefill_cache_indices: torch.Tensor | None  # rows of this step's K/V that go to the cache
    cos: torch.Tensor | None = None  # [T, 1, D/2] rotary tables of this step's positions (MistralModel)
    sin: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None  # [T] arange: row t of cos/sin belongs to token t (fused rope)


class MistralRMSNorm(RMSNorm):
    """RMSNorm; `forward(x, residual)` fuses the residual add and returns (normed, x + residual)."""


class MistralAttention(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int, tp: TPGroup, attention: AttentionBackend, **dd):
        super().__init__()
        self.layer_idx, self.attention = layer_idx, attention
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.sliding_window
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            tp,
            **dd,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, tp, **dd)
        self.rotary_kv_write = None  # FusedOps.rotary_kv_write on CUDA (see use_fused_ops)

    def forward(
        self, x: torch.Tensor | NormedRow, kv: LayerKV | None, step: StepInputs,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (o_proj's output [T, hidden], its LoRA delta for the next norm to add, or None).
        `residual` (no LoRA): added to o_proj's output, by its GEMV's epilogue where the route takes it."""
        q_size, k_size, v_size = self.qkv_proj.local_sizes()
        if isinstance(x, NormedRow) and kv is not None and not step.is_prefill and self.qkv_proj.gemv:
            # one decode row, no LoRA: norm, projection, rope and the K/V write in one kernel
            qkv = self.qkv_proj.gemv.qkv_rope(x, self.qkv_proj.weight, self.num_heads, self.num_kv_heads,
                                              kv, step)  # fmt: skip
            if qkv is not None:
                q = qkv[:, :q_size].view(1, -1, self.head_dim)
                attn = self.attention.decode(q, kv, step.seqlen, step.block_tables, step.max_s,
                                             scale=self.scale, window=self.window)  # fmt: skip
                return self._project_out(attn, 1, step, residual)
        lora = begin_lora(step.adapter_data, self.layer_idx, "qkv_proj", x, (q_size, k_size, v_size))
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        t, d = qkv.shape[0], self.head_dim
        delta = lora_output(lora, qkv)  # [T, (Hq + 2 Hkv) * D] or None
        q = qkv[:, :q_size]
        k = qkv[:, q_size : q_size + k_size]
        v = qkv[:, q_size + k_size :]
        # A prefill without a cached prefix that caches every new token may write before it attends
        # (it reads k and v from these tensors): then it takes the decode path's fused kernel too.
        fused_prefill = step.is_prefill and step.prefill_cache_indices is None and not (
            step.block_tables is not None and step.seqlen.has_cached_prefix()
        )
        if kv is not None and self.rotary_kv_write is not None and (not step.is_prefill or fused_prefill):
            # One kernel: rope on q, k in place and the K/V write by slot (decode writes before reading);
            # it adds the LoRA delta of q, k and v first.
            q, k, v = q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)  # [T, H, D] views of qkv
            if delta is not None:
                delta = (
                    delta[:, :q_size].view(t, -1, d),
                    delta[:, q_size : q_size + k_size].view(t, -1, d),
                    delta[:, q_size + k_size :].view(t, -1, d),
                )
            self.rotary_kv_write(
                q,
                k,
                v,
                step.token_rows,
                step.cos[:, 0],
                step.sin[:, 0],
                kv.k,
                kv.v,
                step.slots,
                k_scale=kv.k_scale,
                v_scale=kv.v_scale,
                delta=delta,
                # a programmatic dependent of the projection, letting the attention launch early
                pdl=self.attention.pdl and not step.is_prefill and t <= self.attention.pdl_max_rows,
            )
            if step.is_prefill:
                attn = self.attention.prefill(
                    q, k, v, kv, step.seqlen, step.block_tables, scale=self.scale, window=self.window
                )
            else:
                attn = self.attention.decode(
                    q, kv, step.seqlen, step.block_tables, step.max_s, scale=self.scale, window=self.window
                )
            return self._project_out(attn, t, step, residual)
        if delta is not None:
            qkv.add_(delta)  # q, k, v are views of qkv
        q, k = RotaryEmbedding.apply(q.view(t, -1, d), k.view(t, -1, d), step.cos, step.sin)  # [T, H, D]
        v = v.view(t, -1, d)  # [T, Hkv, D]

        if step.is_prefill:
            # Attend first, cache after: a cached prefix is read before this step's writes, which (with
            # a window-sized ring of blocks) may reuse the slots of prefix keys that early queries need.
            attn = self.attention.prefill(
                q, k, v, kv, step.seqlen, step.block_tables, scale=self.scale, window=self.window
            )
            self._write_cache(kv, k, v, step)
        else:
            self._write_cache(kv, k, v, step)  # decode reads the new token's K/V from the cache
            attn = self.attention.decode(
                q, kv, step.seqlen, step.block_tables, step.max_s, scale=self.scale, window=self.window
            )
        return self._project_out(attn, t, step, residual)

    def _project_out(
        self, attn: torch.Tensor, t: int, step: StepInputs, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = attn.reshape(t, -1)  # [T, Hq * D]
        lora = begin_lora(step.adapter_data, self.layer_idx, "o_proj", attn, (self.o_proj.output_size,))
        assert lora is None or residual is None, "the LoRA delta is added before the residual"
        out = self.o_proj(attn, residual)  # [T, hidden]
        return out, lora_output(lora, out)

    @staticmethod
    def _write_cache(kv: LayerKV | None, k: torch.Tensor, v: torch.Tensor, step: StepInputs) -> None:
        if kv is None:
            return
        if step.prefill_cache_indices is not None:  # sliding window: only the last W tokens are kept
            k, v = k[step.prefill_cache_indices], v[step.prefill_cache_indices]
        kv.write(k, v, step.slots)


class MistralMLP(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int, tp: TPGroup, **dd):
        super().__init__()
        self.layer_idx = layer_idx
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], tp, **dd)
        self.silu_and_mul = None  # FusedOps.silu_and_mul on CUDA (see use_fused_ops)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, tp, **dd)

    def forward(
        self, x: torch.Tensor | NormedRow, adapter_data: AdapterHook | None, defer_act: bool = False,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (down_proj's output [T, hidden], its LoRA delta for the next norm to add, or None).
        `defer_act` (one row, no LoRA): down_proj's GEMV computes silu_and_mul itself; `residual` (no
        LoRA): added to down_proj's output (by the GEMV's epilogue where the route takes it)."""
        lora = begin_lora(adapter_data, self.layer_idx, "gate_up_proj", x, self.gate_up_proj.local_sizes())
        gate_up = self.gate_up_proj(x)  # [T, 2 * I / world]
        delta = lora_output(lora, gate_up)
        if defer_act:
            assert delta is None, "a deferred activation has no LoRA delta to add"
            act = SiluMulRow(gate_up, self.silu_and_mul)
        elif self.silu_and_mul is not None and gate_up.is_cuda:
            act = self.silu_and_mul(gate_up, delta=delta)  # [T, I / world], one kernel
        else:
            if delta is not None:
                gate_up = gate_up + delta
            gate, up = gate_up.chunk(2, dim=-1)
            act = nn.functional.silu(gate) * up  # [T, I / world]
        lora = begin_lora(adapter_data, self.layer_idx, "down_proj", act, (self.down_proj.output_size,))
        assert lora is None or residual is None, "the LoRA delta is added before the residual"
        out = self.down_proj(act, residual)
        # finish here, not in the next layer's norm: act may be freed (and its memory reused) once the
        # current stream has waited for the LoRA work that reads it
        return out, lora_output(lora, out)


class MistralLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int, tp: TPGroup, attention: AttentionBackend, **dd):
        super().__init__()
        self.input_layernorm = MistralRMSNorm(config.hidden_size, config.rms_norm_eps, **dd)
        self.self_attn = MistralAttention(config, layer_idx, tp, attention, **dd)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, config.rms_norm_eps, **dd)
        self.mlp = MistralMLP(config, layer_idx, tp, **dd)
        # one row without LoRA: the norms and silu_and_mul go to the projections deferred, for their GEMV
        # to compute, and o_proj / down_proj add the residual (model/layers/deferred.py); set by
        # FlashMistralForCausalLM.use_gemv
        self.defer_rows = False

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, delta: torch.Tensor | None,
        kv: LayerKV | None, step: StepInputs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (this block's output, residual stream before it, the output's LoRA delta or None); the
        next norm adds the three."""
        if (self.defer_rows and hidden.shape[0] == 1 and residual is None and delta is None
                and not has_lora(step.adapter_data)):  # fmt: skip
            # hidden is the residual stream itself: each block's output arrives with it added
            attn, _ = self.self_attn(NormedRow(self.input_layernorm, hidden), kv, step, residual=hidden)
            normed = NormedRow(self.post_attention_layernorm, attn)
            out, _ = self.mlp(normed, step.adapter_data, defer_act=True, residual=attn)
            return out, None, None
        normed, residual = self.input_layernorm(hidden, residual, delta)
        attn, delta = self.self_attn(normed, kv, step)
        normed, residual = self.post_attention_layernorm(attn, residual, delta)
        out, delta = self.mlp(normed, step.adapter_data)
        return out, residual, delta


class MistralModel(nn.Module):
    def __init__(self, config: MistralConfig, tp: TPGroup, attention: AttentionBackend, **dd):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, **dd)
        self.layers = nn.ModuleList(
            MistralLayer(config, i, tp, attention, **dd) for i in range(config.num_hidden_layers)
        )
        self.norm = MistralRMSNorm(config.hidden_size, config.rms_norm_eps, **dd)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, device=dd.get("device"))

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        kv_cache: Sequence[LayerKV] | None,
        step: StepInputs,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        step.cos, step.sin = self.rotary.cos_sin(position_ids, hidden.dtype)  # once for all layers
        step.token_rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        residual = delta = None
        for i, layer in enumerate(self.layers):
            kv = None if kv_cache is None else kv_cache[i]
            hidden, residual, delta = layer(hidden, residual, delta, kv, step)
        hidden, _ = self.norm(hidden, residual, delta)
        return hidden


class FlashMistralForCausalLM(nn.Module):
    """Build with weights (model/weights.Weights) to load them; `weights=None` leaves parameters
    uninitialised (for memory planning); `attention=None` selects the best backend for device/dtype."""

    def __init__(
        self,
        config: MistralConfig,
        weights=None,
        tp: TPGroup | None = None,
        attention: AttentionBackend | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        tp = tp or TPGroup()
        dtype = dtype or (weights.dtype if weights is not None else torch.float32)
        device = torch.device(device or (weights.device if weights is not None else "cpu"))
        self.config, self.tp, self.dtype, self.device = config, tp, dtype, device
        self.attention = attention or select_attention_backend(device, dtype)
        dd = {"dtype": dtype, "device": device}
        self.model = MistralModel(config, tp, self.attention, **dd)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, **dd)
        ops = FusedOps.for_device(device, dtype, config.head_dim)
        gemv = None
        if router_supported(device, dtype):  # one-row projections through the Triton GEMV
            gemv = GemvRouter.for_shapes([tuple(m.weight.shape) for m in self.decoder_projections()], device)
            ops = ops.with_pdl()
        self.use_fused_ops(ops)
        self.use_gemv(gemv)
        if weights is not None:
            from model.weights import load_weights

            load_weights(self, weights)

    def decoder_projections(self) -> list[nn.Module]:
        """The four projection modules of every decoder layer (not lm_head)."""
        out = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            out += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        return out

    def use_gemv(self, router: GemvRouter | None) -> None:
        """Route the decoder projections' one-row matmuls through `router` (model/layers/gemv.py; None:
        cuBLAS for all). With PDL the decode attention's last kernel triggers the o_proj GEMV early."""
        for module in self.decoder_projections():
            module.gemv = router
        for layer in self.model.layers:
            layer.defer_rows = router is not None and router.prologues and self.tp.world_size == 1
        self.attention.pdl = router is not None and router.pdl

    def use_fused_ops(self, ops: FusedOps) -> None:
        """Route norms and the decode rope + KV write through `ops` (FusedOps() restores plain torch)."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused = ops.add_rmsnorm
            elif isinstance(module, MistralAttention):
                module.rotary_kv_write = ops.rotary_kv_write
            elif isinstance(module, MistralMLP):
                module.silu_and_mul = ops.silu_and_mul

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp: TPGroup | None = None,
        attention: AttentionBackend | None = None,
    ) -> FlashMistralForCausalLM:
        from model.weights import Weights

        config = MistralConfig.from_pretrained(model_dir)
        weights = Weights.from_dir(model_dir, dtype=dtype, device=device)
        return cls(config, weights, tp or TPGroup(), attention)

    @property
    def block_size(self) -> int:
        """KV block size the attention backend needs; size the cache and block manager with it."""
        return self.attention.block_size

    def projection_weight(self, layer_idx: int, target: str) -> torch.Tensor:
        """This rank's base weight of a LoRA-targetable projection (a view; DoRA's norms read it):
        [out_local, in_local], sliced as the layer is; lm_head (layer_idx -1): [vocab rows per rank,
        hidden], the last rank's block ending in zero padding rows."""
        if target == "lm_head":
            return self.lm_head.weight
        layer = self.model.layers[layer_idx]
        if target in ("q_proj", "k_proj", "v_proj"):
            qkv = layer.self_attn.qkv_proj
            q, k, v = qkv.local_sizes()
            start, n = {"q_proj": (0, q), "k_proj": (q, k), "v_proj": (q + k, v)}[target]
            return qkv.weight.narrow(0, start, n)
        if target in ("gate_proj", "up_proj"):
            n = layer.mlp.gate_up_proj.local_sizes()[0]
            return layer.mlp.gate_up_proj.weight.narrow(0, 0 if target == "gate_proj" else n, n)
        if target == "o_proj":
            return layer.self_attn.o_proj.weight
        if target == "down_proj":
            return layer.mlp.down_proj.weight
        raise ValueError(f"unknown projection {target!r}")

    @torch.no_grad()  # not inference_mode: callers may update the returned logits in place
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        cu_seqlen_prefill: torch.Tensor | None,  # [B+1] int32; None: decode
        kv_cache: Sequence[LayerKV] | None,
        block_tables: torch.Tensor | None,  # [B, max_blocks] int32
        slots: torch.Tensor | None,  # [T] int64
        seqlen: Seqlen,
        max_s: int,
        adapter_data: AdapterHook | None,
        prefill_cache_indices: torch.Tensor | None = None,
        lm_head_indices: torch.Tensor | None = None,
        skip_lm_head: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """-> (logits [T or len(lm_head_indices), V] or the final hidden states if skip_lm_head, None)."""
        is_prefill = cu_seqlen_prefill is not None
        window = self.config.sliding_window
        if not is_prefill and window is not None:
            # Decode reads at most the last W keys of each of its Q query tokens per sequence (Q > 1 in a
            # speculative verify step); input_lengths stay true lengths (absolute positions).
            q_len = input_ids.shape[0] // max(seqlen.input_lengths.shape[0], 1)
            max_s = min(max_s, window + q_len - 1)
        if prefill_cache_indices is not None and slots is not None:
            slots = slots[prefill_cache_indices]  # slots cover every token; only these get cached
        step = StepInputs(
            is_prefill=is_prefill,
            block_tables=block_tables,
            slots=slots,
            seqlen=seqlen,
            max_s=max_s,
            adapter_data=adapter_data,
            prefill_cache_indices=prefill_cache_indices,
        )
        hidden = self.model(input_ids, position_ids, kv_cache, step)  # [T, hidden]
        if lm_head_indices is not None:
            hidden = hidden[lm_head_indices]  # [N, hidden]
        if skip_lm_head:
            return hidden, None
        logits = self.lm_head(hidden)  # [N, V]
        if adapter_data is not None:
            adapter_data.add_lora(-1, "lm_head", hidden, logits)
        return logits, None
