"""Direct logit attribution at the answer position, grouped by where the information came from.

The final residual stream at the last position is a sum of writes: the token's embedding, every
attention layer's output and every MLP's output. With the final norm's scale frozen at its value
on that residual (its mean-centring and learned scale are linear), the target's logit (or its
logit difference with a foil) splits exactly into one term per write. Each attention head's write
splits further by key position, since it is a sum over keys of ``pattern[last, key] * v_key W_O``:
by the group of the key (image, prompt, template) the head read from. MLP writes are the model's
own computation on the residual (parametric recall). The terms sum to the logit exactly.

Supported: families whose attention and MLP writes enter the residual stream linearly (the adapter's
``nonlinear_writes`` is None: not Gemma 3's sandwich norms, nor Mllama's gated cross-attention
layers) and whose forward applies no final soft cap to the logits (``final_logit_softcap``).
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from einops import einsum, rearrange, repeat
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from .groups import group_mask
from .results import AttributionResult, count, legacy_calls, moved_to_keywords, number
from .targets import Answer, target_ids

SOURCES = ("image", "prompt", "template")


@dataclass(frozen=True)
class FinalNorm:
    """The language model's final norm, linearised: its scale frozen at a residual's value, its
    mean-centring (LayerNorm) and learned weight linear in whatever is added to that residual.

    Attributes:
        centred: whether the norm subtracts the mean first (LayerNorm; RMSNorm does not).
        eps: its epsilon.
        weight: its effective learned scale (``offset + weight``, see the adapter's
            ``final_norm_weight_offset``), float32, or None for a norm without weight.
        bias: a LayerNorm's bias, float32, or None.
    """

    centred: bool
    eps: float
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def of(cls, model) -> FinalNorm:
        norm = model.module(model.family.lm_norm)
        centred = model.family.final_norm_centres(norm)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        weight = norm.weight.float() if norm.weight is not None else None
        offset = model.family.final_norm_weight_offset(norm)
        if weight is not None and offset:
            weight = offset + weight
        bias = getattr(norm, "bias", None)
        bias = bias.float() if centred and bias is not None else None
        return cls(centred, eps, weight, bias)

    def centre(self, x: Tensor) -> Tensor:
        """``x`` mean-centred over its last axis where the norm centres, else ``x``."""
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, resid: Tensor) -> Tensor:
        """``[..., 1]`` the norm's scale at a residual ``[..., d_model]``, to freeze."""
        return torch.rsqrt(self.centre(resid).pow(2).mean(-1, keepdim=True) + self.eps)


def check_linear_writes(model, method: str) -> None:
    """Raise unless the model's attention and MLP writes add up linearly into the residual stream
    that the final norm reads (what direct logit attribution and path patching rest on).

    Raises:
        InputError: naming the family and the adapter's ``nonlinear_writes`` reason.
    """
    reason = model.family.nonlinear_writes
    if reason is not None:
        raise InputError(f"{method} does not support {model.family.name}: {reason} ({method} needs "
                         "attention and MLP writes that add linearly to the residual stream)")


@dataclass(frozen=True, repr=False)  # AttributionResult.__repr__ prints a summary
class DirectLogitAttribution(AttributionResult):
    """Terms of each example's target logit (difference), one row per term.

    Attributes:
        terms: DataFrame with ``example, component`` (``embed``, ``head``, ``attn_bias``, ``mlp``,
            ``norm_bias``, ``head_bias``), ``layer``, ``head``, ``source`` (for heads: image,
            prompt, template) and ``value``.
        logit: ``[batch]`` the model's own target logit (difference) at the last position.
        targets, foils, target_ids, foil_ids, layouts, method: see
            :class:`~lvlm_probe.attribution.results.AttributionResult`.
    """

    terms: pd.DataFrame
    logit: Tensor

    def to_frame(self) -> pd.DataFrame:
        """The terms, one row per (example, term), with each example's ``target`` and ``foil``."""
        answers = self.answers()[["example", "target", "foil"]]
        return self.terms.merge(answers, on="example", how="left")

    def _summary(self) -> list[str]:
        """The size of the decomposition, the mean logit (difference) and the mean credit of each
        group of :meth:`by_source`."""
        heads = self.terms[self.terms["component"] == "head"]
        size = count(len(self.terms), "term")
        if len(heads):
            size += f" over {heads['layer'].nunique()} layers x {heads['head'].nunique()} heads"
        what = "logit difference" if self.foils else "logit"
        groups = self.by_source().mean()
        credit = " ".join(f"{name} {number(value)}" for name, value in groups.items() if name != "total")
        return [size, f"mean {what} {number(self.logit.float().mean())}", f"mean credit {credit}"]

    def by_source(self) -> pd.DataFrame:
        """Per example: the heads' credit by source group, MLPs, embedding and biases, and total."""
        terms = self.terms.assign(group=self.terms["source"].fillna(self.terms["component"]))
        table = terms.pivot_table(index="example", columns="group", values="value", aggfunc="sum",
                                  fill_value=0.0)
        table["total"] = table.sum(axis=1)
        return table

    def plot(self, example: int = 0) -> Figure:
        """One example's credit per layer: heads by source, MLP, stacked."""
        terms = self.terms[(self.terms["example"] == example) & self.terms["layer"].notna()]
        terms = terms.assign(group=terms["source"].fillna(terms["component"]))
        table = terms.pivot_table(index="layer", columns="group", values="value", aggfunc="sum", fill_value=0.0)
        fig = Figure(figsize=(max(4.0, 0.5 * len(table) + 2), 3.4))
        ax = fig.subplots()
        table.plot.bar(ax=ax, stacked=True, width=0.75)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_ylabel("logit contribution")
        ax.set_title(f"direct logit attribution, example {example}", fontsize=9)
        self.suptitle(fig, example, "direct logit attribution (heads by the source they read)")
        fig.tight_layout()
        return fig


@legacy_calls(moved_to_keywords(3, ["foil"]), "dla(model, batch, target, foil=...)")
def dla(model, batch, target: Answer | list[Answer], *, foil: Answer | list[Answer] | None = None
        ) -> DirectLogitAttribution:
    """Direct logit attribution of the target (minus the foil) at the last position.

    Args:
        model: an :class:`~lvlm_probe.LVLM`.
        batch: from ``model.prepare``.
        target: the answer scored, as in :func:`source_split` (one token, one or per example).
        foil: an alternative answer: the terms split the logit difference ``target - foil``;
            default None (the target's logit).

    Returns:
        A :class:`DirectLogitAttribution` whose terms sum to ``logit`` per example.

    Raises:
        InputError: for a family whose writes are not linear (its adapter's ``nonlinear_writes``)
            or whose forward soft-caps the logits (``final_logit_softcap``), or bad targets.

    Example:
        >>> lp.attribution.dla(model, batch, target="yes", foil="no").by_source()
    """
    check_linear_writes(model, "dla")
    cap = model.family.final_logit_softcap(model.config)
    if cap:
        raise InputError(f"dla does not support {model.family.name} with a final logit soft cap "
                         f"(logits = {cap} * tanh(logits / {cap})): the soft cap is not linear in the writes")
    targets, foils, ids = target_ids(model, batch, target, foil)
    head = model.module(model.family.lm_head)
    direction = head.weight[ids[:, 0]].float()  # [b, d]
    if foils:
        direction = direction - head.weight[ids[:, 1]].float()
    logit_scale = model.family.final_logit_scale(model.config)
    if logit_scale is not None:  # the forward scales the logits: scale the direction read
        direction = direction * logit_scale
    norm = FinalNorm.of(model)
    L = model.n_layers
    last_names = ["blocks.0.hook_resid_pre", f"blocks.{L - 1}.hook_resid_post", "blocks.*.hook_mlp_out",
                  "blocks.*.attn.hook_pattern"]
    with model.capture(last_names, positions="last", reduce="last") as last, \
            model.capture("blocks.*.attn.hook_v") as values:
        logits = model.forward(batch, last_position=True).logits[:, -1].float()
    logit = (logits.gather(1, ids.to(logits.device)[:, :1])[:, 0]
             - (logits.gather(1, ids.to(logits.device)[:, 1:])[:, 0] if foils else 0.0)).cpu()

    resid = last[f"blocks.{L - 1}.hook_resid_post"].float()  # [b, d]
    scale = norm.scale(resid)  # frozen
    weight = norm.weight if norm.weight is not None else 1.0

    def read(write: Tensor) -> Tensor:
        """The logit term of a write ``[..., b, d]``: through the frozen norm and the direction."""
        return einsum(norm.centre(write) * scale * weight, direction, "... b d, b d -> ... b")

    groups = _groups(batch)  # [b, seq, 3]
    rows = []

    def add(component, values_, layer=None, head_=None, source=None):
        for i, v in enumerate(values_.tolist()):
            rows.append(dict(example=i, component=component, layer=layer, head=head_, source=source, value=v))

    add("embed", read(last["blocks.0.hook_resid_pre"].float()).cpu())
    n_heads = model.n_heads
    for layer in range(L):
        n_kv = model.n_kv_heads_of(layer)
        o_proj = model.module(f"{model.family.lm_layers}.{layer}.{model.family.lm_attn_out}")
        w_o = rearrange(o_proj.weight.float(), "m (h d) -> h d m", h=n_heads)
        pattern = last[f"blocks.{layer}.attn.hook_pattern"].float()  # [b, h, k]
        v = repeat(values[f"blocks.{layer}.attn.hook_v"].float(), "b k kv d -> b k (kv g) d", g=n_heads // n_kv)
        per_source = einsum(pattern, v, groups.to(v.device), "b h k, b k h d, b k s -> s h b d")
        writes = einsum(per_source, w_o, "s h b d, h d m -> s h b m")
        terms = read(writes).cpu()  # [source, head, b]
        for s, source in enumerate(SOURCES):
            for h in range(n_heads):
                add("head", terms[s, h], layer, h, source)
        if o_proj.bias is not None:
            add("attn_bias", read(o_proj.bias.float().expand_as(resid)).cpu(), layer)
        add("mlp", read(last[f"blocks.{layer}.hook_mlp_out"].float()).cpu(), layer)
    if norm.bias is not None:
        add("norm_bias", einsum(norm.bias.expand_as(resid), direction, "b d, b d -> b").cpu())
    bias = getattr(head, "bias", None)
    if bias is not None:
        term = (bias[ids[:, 0]] - (bias[ids[:, 1]] if foils else 0.0)).float()
        add("head_bias", (term * logit_scale if logit_scale is not None else term).cpu())
    return DirectLogitAttribution(pd.DataFrame(rows), logit, method="dla", targets=targets, foils=foils,
                                  target_ids=ids[:, 0], foil_ids=ids[:, 1] if foils else None,
                                  layouts=list(batch.layouts))


def _groups(batch) -> Tensor:
    """``[batch, seq, 3]``: one-hot source group (image, prompt, template) of every key position."""
    return torch.stack([group_mask(batch, source, required=False) for source in SOURCES], -1).float()
