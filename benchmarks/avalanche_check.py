"""Cross-check rows: avalanche-lib's own Naive, EWC and LwF strategies on the same cached features
and the same model (:class:`clipzoo.bench.baselines.SharedAdapter` with the text-initialised heads).

Only the training loop and regulariser are avalanche's: its strategy trains the model (AdamW at the
benchmark's learning rate, no schedule, optimiser state carried across tasks as avalanche does),
and evaluation is ours, so the rows line up with ``naive``, ``ewc`` and ``lwf``. Matching settings:
avalanche's EWC penalty is ``lambda * sum F (theta - theta*)^2`` per past task ("separate" mode), so
it gets ``ewc_lambda / 2``; its LwF distillation has no ``T^2`` factor, so it gets ``alpha * T^2``.
Needs the optional extra ``clipzoo[bench]``. The strategies' state is not serialisable here, so on
``resume`` these rows are re-trained on the finished tasks (each step is seeded, so identically).
"""

from __future__ import annotations

import time
import warnings

import torch

from clipzoo.bench.baselines import Data, NaiveSequential, numel
from clipzoo.zoo.train import TrainSettings


class AvalancheStrategy(NaiveSequential):
    """One of avalanche's strategies (``kind``: naive, ewc or lwf) training the shared adapter."""


    def __init__(self, kind: str, class_embs: list[torch.Tensor], logit_scale: float, train: TrainSettings,
                 ewc_lambda: float, lwf_alpha: float, temperature: float = 2.0):
        super().__init__(class_embs, logit_scale, train)
        self.name, self.kind = f"avalanche-{kind}", kind
        self.note = f"avalanche-lib {kind} strategy (cross-check of '{kind}')"
        with warnings.catch_warnings():  # its import and logger-less evaluator warn (solvers, loggers)
            warnings.simplefilter("ignore")
            from avalanche.training.plugins import EvaluationPlugin
            from avalanche.training.supervised import EWC, LwF, Naive

            opt = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
            common = dict(model=self.model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
                          train_mb_size=train.batch_size, train_epochs=train.epochs, eval_mb_size=256,
                          device="cpu", evaluator=EvaluationPlugin(loggers=[]))
            if kind == "ewc":
                self.strategy = EWC(ewc_lambda=ewc_lambda / 2, mode="separate", **common)
            elif kind == "lwf":
                self.strategy = LwF(alpha=lwf_alpha * temperature ** 2, temperature=temperature, **common)
            else:
                self.strategy = Naive(**common)

    def learn(self, t: int, x: torch.Tensor, y: torch.Tensor) -> dict:
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset

        t0 = time.perf_counter()
        torch.manual_seed(self.train.seed * 1000 + t)  # avalanche's loader shuffles with the global generator
        self.current = t
        self.model.add_head(self.class_embs[t])
        data = tensor_dataset(x, y + self.offset(t), task_labels=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.strategy.train(benchmark_from_datasets(train=[data]).train_stream[0])
        self.model.eval()
        return {"train_seconds": time.perf_counter() - t0}

    def stored_params(self) -> int:
        plugin = next((p for p in self.strategy.plugins if hasattr(p, "importances") or hasattr(p, "lwf")), None)
        extra = 0
        if plugin is not None and hasattr(plugin, "importances"):
            extra = sum(numel(d.data for d in v.values()) for v in [*plugin.importances.values(),
                                                                     *plugin.saved_params.values()])
        elif plugin is not None and plugin.lwf.prev_model is not None:
            extra = numel(plugin.lwf.prev_model.state_dict().values())
        return super().stored_params() + extra

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, state: dict[str, torch.Tensor], data: Data) -> None:
        for t, (x, y) in enumerate(data):
            self.learn(t, x, y)


def make_cross_checks(embs: list[torch.Tensor], scale: float, train: TrainSettings, s) -> dict:
    """Factories of the three cross-check methods, by name."""
    return {f"avalanche-{k}": (lambda k=k: AvalancheStrategy(k, embs, scale, train, s.ewc_lambda, s.lwf_alpha))
            for k in ("naive", "ewc", "lwf")}
