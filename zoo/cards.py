"""Model cards (``README.md`` with YAML metadata) for a zoo and for each of its experts.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData``: library name, tags, base model
(when the backbone is an ``hf-hub:`` repository), the task classes, accuracies as ``model-index``
results (every recorded metric under ``results``) and the training settings. Cards are a pure function of the registry, so pushing an
unchanged zoo leaves them unchanged; push generates one only where the zoo holds none.
"""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

LIBRARY = "clipzoo"
BASE_TAGS = ["clipzoo", "clip", "open_clip", "continual-learning", "mixture-of-experts"]
METRICS = {"test_acc": "test accuracy", "zero_shot_acc": "zero-shot accuracy"}


def _backbone_meta(reg: dict) -> dict:
    bb = reg["backbone"]
    return {"model": bb["model"], "pretrained": bb.get("pretrained"), "fingerprint": bb["fingerprint"]}


def _base_model(reg: dict) -> str | None:
    model = reg["backbone"]["model"]
    return model[len("hf-hub:"):] if model.startswith("hf-hub:") else None


def _results(name: str, rec: dict) -> list[EvalResult]:
    return [EvalResult(task_type="image-classification", dataset_type=name, dataset_name=name,
                       metric_type="accuracy", metric_name=label, metric_value=rec["metrics"][key])
            for key, label in METRICS.items() if key in rec["metrics"]]


def _card(data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def expert_card(reg: dict, name: str, repo_id: str) -> ModelCard:
    """The card of one expert (``experts/<name>/README.md``)."""
    rec = reg["experts"][name]
    results = _results(name, rec)
    data = ModelCardData(
        library_name=LIBRARY, pipeline_tag="image-classification", base_model=_base_model(reg),
        tags=BASE_TAGS + [rec["kind"]], model_name=f"{repo_id}/{name}" if results else None,
        eval_results=results or None, backbone=_backbone_meta(reg), expert=name, kind=rec["kind"],
        classes=rec["classes"], training=rec["training"], metrics=["accuracy"], results=rec["metrics"],
        trainable_params=rec.get("trainable_params"), sha256=rec["sha256"],
    )
    metrics = "\n".join(f"| {k} | {v} |" for k, v in rec["metrics"].items())
    body = (
        f"# {name}: a clipzoo expert\n\n"
        f"A `{rec['kind']}` expert for {len(rec['classes'])} classes "
        f"({', '.join(rec['classes'][:10])}{', ...' if len(rec['classes']) > 10 else ''}) on the frozen "
        f"`{reg['backbone']['model']}` backbone; it is one folder of the zoo `{repo_id}`.\n\n"
        f"| metric | value |\n|---|---|\n{metrics}\n\n"
        "Training settings and the file hashes are in this card's metadata and in the zoo's `registry.json`.\n"
    )
    return _card(data, body)


def zoo_card(reg: dict, repo_id: str) -> ModelCard:
    """The card of the whole zoo (``README.md`` at the repository root)."""
    experts = reg["experts"]
    results = [r for name, rec in experts.items() for r in _results(name, rec)]
    data = ModelCardData(
        library_name=LIBRARY, pipeline_tag="image-classification", base_model=_base_model(reg),
        tags=BASE_TAGS + sorted({rec["kind"] for rec in experts.values()}),
        model_name=repo_id if results else None, eval_results=results or None,
        metrics=["accuracy"], backbone=_backbone_meta(reg), experts=list(experts),
        router=reg.get("router", {}).get("kind"),
    )
    rows = "\n".join(f"| {n} | {r['kind']} | {len(r['classes'])} | {r['metrics'].get('test_acc', '')} |"
                     for n, r in experts.items())
    body = (
        f"# {repo_id}: a clipzoo zoo\n\n"
        f"A frozen `{reg['backbone']['model']}` CLIP backbone with one expert per task and a router that picks "
        "the expert for each image. This repository is the zoo directory itself: `registry.json` lists every "
        "file with its sha256, one folder per expert under `experts/`.\n\n"
        f"| expert | kind | classes | test accuracy |\n|---|---|---|---|\n{rows}\n\n"
        "## Use\n\n"
        f"```bash\nclipzoo pull {repo_id} --zoo myzoo\nclipzoo predict --zoo myzoo photo.png\n```\n"
    )
    return _card(data, body)
