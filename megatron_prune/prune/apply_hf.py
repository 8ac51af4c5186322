"""Apply a PrunePlan to an HF LLaMA checkpoint, single process: for users with one GPU, and as the second path
that the Megatron pruner is checked against (same plan -> same tensors after export).

Width pruning is uniform in count over the kept layers, so the output is a plain LlamaForCausalLM directory
(head_dim is written explicitly: it no longer equals hidden_size / heads once hidden channels are pruned).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from megatron_prune.checkpoint.atomic import atomic_dir, check_free_space, check_output_dir
from megatron_prune.checkpoint.consistency import NonFiniteError, describe_non_finite, is_finite
from megatron_prune.checkpoint.hf_io import (CheckpointError, HFReader, copy_tokenizer_files, write_hf_checkpoint)
from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.keys import (EMBEDDING, FC1, FC2, FINAL_NORM, INPUT_NORM, OUTPUT, PRE_MLP_NORM, PROJ,
                                            QKV, hf_expected_keys)
from megatron_prune.config.shape import DTYPE_BYTES, LlamaShape, canonical_dtype, torch_dtype
from megatron_prune.prune.apply import take, target_shape
from megatron_prune.prune.plan import LayerPlan, PrunePlan

Getter = Callable[[str], torch.Tensor]


def _ix(idx: list[int]) -> torch.Tensor:
    return torch.as_tensor(idx, dtype=torch.long)


def head_rows(lp: LayerPlan, src: LlamaShape) -> torch.Tensor:
    """Rows of q_proj (= columns of o_proj) of the kept heads, in (group, head) order."""
    return _ix(layout.hf_head_rows(lp.groups, lp.heads, src.heads_per_group, src.kv_channels))


def group_rows(lp: LayerPlan, src: LlamaShape) -> torch.Tensor:
    """Rows of k_proj / v_proj of the kept query groups."""
    return _ix(layout.hf_group_rows(lp.groups, src.kv_channels))


def prune_hf_tensors(get: Getter, plan: PrunePlan) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, pruned tensor) for the whole model; `get(key)` returns the full source tensor."""
    src = plan.source
    hidden = _ix(list(plan.hidden))
    (embed,), (norm,), (lm_head,) = EMBEDDING.hf, FINAL_NORM.hf, OUTPUT.hf
    yield embed, take(get(embed), cols=hidden)
    for new, lp in enumerate(plan.layers):
        heads, groups, ffn = head_rows(lp, src), group_rows(lp, src), _ix(list(lp.ffn))
        q, k, v = QKV.hf
        gate, up = FC1.hf
        slices = ((INPUT_NORM.hf[0], hidden, None), (q, heads, hidden), (k, groups, hidden), (v, groups, hidden),
                  (PROJ.hf[0], hidden, heads), (PRE_MLP_NORM.hf[0], hidden, None), (gate, ffn, hidden),
                  (up, ffn, hidden), (FC2.hf[0], hidden, ffn))
        for key, rows, cols in slices:
            yield key.format(new), take(get(key.format(lp.source)), rows=rows, cols=cols)
    yield norm, take(get(norm), rows=hidden)
    if not src.tie_word_embeddings:
        yield lm_head, take(get(lm_head), cols=hidden)


def prune_hf(hf_dir: str | Path, plan: PrunePlan, save: str | Path, dtype: str | None = None,
             overwrite: bool = False, progress: bool = True, plan_path: str | Path | None = None,
             allow_non_finite: bool = False) -> LlamaShape:
    """Prune an HF directory by `plan` into `save` (atomic); returns the pruned shape. Source tensors holding
    NaN / Inf are refused as they are read (unless allow_non_finite)."""
    check_output_dir(save, overwrite, inputs={"--hf-dir": hf_dir, "--plan": plan_path})
    with HFReader(hf_dir) as reader:
        plan.check_source(reader.shape, "HF model")
        missing = [k for k in hf_expected_keys(reader.shape.num_layers, reader.shape.tie_word_embeddings)
                   if k not in reader]
        if missing:
            raise CheckpointError(f"{hf_dir}: {len(missing)} tensors missing, e.g. {missing[:3]}")
        reader.check_shapes()
        src_dtype = canonical_dtype(reader.config.get("dtype") or reader.config.get("torch_dtype") or "float32")
        shape = target_shape(plan, reader.shape).replace(dtype=canonical_dtype(dtype or src_dtype))
        config = shape.to_hf_config(reader.config)
        cast = torch_dtype(shape.dtype)
        total = 3 + 9 * shape.num_layers - shape.tie_word_embeddings
        check_free_space(Path(save).parent, shape.num_params() * DTYPE_BYTES[shape.dtype], save)

        def get(key: str) -> torch.Tensor:
            t = reader[key][:]
            if not allow_non_finite and not is_finite(t):
                raise NonFiniteError(f"{reader[key].path}: tensor {key!r} holds non-finite values "
                                     f"({describe_non_finite(t)}); pass --allow-non-finite to prune it anyway")
            return t

        def tensors():
            with tqdm(total=total, desc="prune-hf", unit="tensor", disable=not progress, leave=False) as bar:
                for key, t in prune_hf_tensors(get, plan):
                    bar.update()
                    t = t.to(cast)
                    if not allow_non_finite and not is_finite(t):  # finite sources: the cast overflowed
                        raise NonFiniteError(f"{hf_dir}: pruned tensor {key!r} overflows {shape.dtype} (pass "
                                             f"--dtype fp32, or --allow-non-finite)")
                    yield key, t

        with atomic_dir(save, overwrite) as tmp:
            write_hf_checkpoint(tmp, config, tensors())
            copy_tokenizer_files(Path(hf_dir), tmp)
            plan.save(tmp / "prune_plan.json")
    return shape
