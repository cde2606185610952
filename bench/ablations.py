"""The benchmarks' training ablations, as subclasses of the runtime trainer's `Method`
(`runtime/method/trainer.py`), so that the product trainer has one path (Perfusion's):

- `TrainedKeys`: o*_K is optimised too, from the same start (the paper's unlocked ablation);
  the artifact stores o*_K in full.
- `EmbeddingOnly`: textual inversion: only the token embedding is trained and the UNet runs
  as it is, with no edit (`_finetune.py` also uses it, and trains the UNet's own weights).
- `AllPositions`: Perfusion with the edit at every text position, the padding after the
  prompt's end-of-text token included, as concept files before format 3 were trained (the
  trainer edits only the prompt's own positions: `edit_positions.py`,
  `leakage.py --method all_positions`).
- `NoContext`: Perfusion without the supercategory's leading words before the token: the
  token alone stands for the whole first supercategory, as before 2026-12-04
  (docs/runtime.md, "The supercategory's leading words").

`METHODS` maps the names the benchmarks record to them.
"""

from __future__ import annotations

from torch import Tensor, nn

from perfusion_runtime.method.processor import ConceptState
from perfusion_runtime.method.trainer import PERFUSION, Method, _Run


class TrainedKeys(Method):
    name = "trained_keys"

    def key_target(self, locked: Tensor) -> Tensor:
        return nn.Parameter(locked.clone())

    def trainable(self, run: _Run) -> dict[str, nn.Parameter]:
        keys = {f"o_k.{n}": p for n, p in run.o_k.items() if isinstance(p, nn.Parameter)}
        return {**super().trainable(run), **keys}

    def stored_i_super(self, run: _Run) -> Tensor | None:
        return None  # the keys were trained: the file keeps o*_K itself


class EmbeddingOnly(Method):
    name = "embedding_only"

    def trainable(self, run: _Run) -> dict[str, nn.Parameter]:
        return {"embedding": run.embedding}

    def edit(self, state: ConceptState, run: _Run, i_star: Tensor) -> None:
        pass  # the UNet as it is


class AllPositions(Method):
    name = "all_positions"
    positions = "all"


class NoContext(Method):
    name = "no_context"
    context = False


METHODS: dict[str, Method] = {m.name: m for m in (PERFUSION, TrainedKeys(), EmbeddingOnly(),
                                                  AllPositions(), NoContext())}
