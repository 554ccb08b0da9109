"""How good a sampler's images are, judged by a published classifier (digits_cnn) through onnxruntime, as a
client would run both: does the classifier read the digit that was asked for (accuracy vs label), and how far is
the samples' distribution from real test images in the classifier's penultimate features (a Frechet distance, FID's
formula with digits_cnn in place of Inception)? The distance means something only beside a reference: the same
distance between real training images and the test images, from as many images as there are samples."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from training.spec import SpecError

LOGITS = "logits"


def find_judge(repo: Path, name: str, job: str) -> tuple[Path, int]:
    """The judge's newest version that has a model.onnx; a SpecError before any training when there is none."""
    model_dir = repo / name
    versions = sorted((int(p.name) for p in model_dir.glob("[0-9]*") if p.name.isdigit()
                       and (p / "model.onnx").is_file()), reverse=True) if model_dir.is_dir() else []
    if not versions:
        raise SpecError(f"{job} is judged by the published {name}, and {model_dir} holds no version with a "
                        f"model.onnx; expected it trained first: deepserve train {name} --repository {repo}")
    return model_dir / str(versions[0]) / "model.onnx", versions[0]


class Judge:
    """The classifier's graph with its penultimate activation added as a second output, in memory: the input of
    the last Gemm (or MatMul + Add) that computes the logits."""

    def __init__(self, path: Path) -> None:
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path))
        self.features = penultimate(model)
        model.graph.output.append(onnx.helper.make_tensor_value_info(self.features, onnx.TensorProto.FLOAT, None))
        self.input = model.graph.input[0].name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class, penultimate features) of [N, 1, H, W] images."""
        logits, feats = self.session.run([LOGITS, self.features], {self.input: images.astype(np.float32)})
        return logits.argmax(1), feats


def penultimate(model: Any) -> str:
    produced = {out: node for node in model.graph.node for out in node.output}
    weights = {init.name for init in model.graph.initializer}
    node = produced.get(LOGITS)
    if node is not None and node.op_type == "Add":  # MatMul + bias
        data = [i for i in node.input if i not in weights and i in produced]
        node = produced[data[0]] if len(data) == 1 else None
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        raise SpecError(f"the judge's graph does not end in a linear layer producing {LOGITS!r}; expected the "
                        "published digits_cnn")
    return node.input[0]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as FID computes it (Heusel et al. 2017). Dead ReLU
    features make the covariances singular; as pytorch-fid does, a tiny ridge is added when sqrtm fails."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(root).all():
            ridge = np.eye(len(s_a)) * 1e-6
            root = linalg.sqrtm((s_a + ridge) @ (s_b + ridge))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * np.real(root)))


def per_label_rows(y: np.ndarray, per_label: int, classes: int) -> np.ndarray:
    """The first `per_label` rows of each class (fewer where a class has fewer)."""
    return np.concatenate([np.flatnonzero(y == c)[:per_label] for c in range(classes)])


def sample_quality(sampler_path: Path, judge_path: Path, judge_version: int, data: Any, latent: int,
                   per_label: int, seed: int) -> dict[str, Any]:
    """Sample `per_label` images of every label from the exported sampler and judge them."""
    from training.export import session
    from training.generative import SAMPLER_OUTPUTS

    classes = data.num_classes
    judge = Judge(judge_path)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes, dtype=np.int64), per_label)
    z = rng.standard_normal((len(labels), latent)).astype(np.float32)
    (images,) = session(sampler_path).run(SAMPLER_OUTPUTS, {"z": z, "label": labels})
    predicted, fake = judge(images)
    _, test = judge(data.test.x)
    real_rows = per_label_rows(data.train.y, per_label, classes)
    real_predicted, real = judge(data.train.x[real_rows])
    card = json.loads((judge_path.parent / "card.json").read_text()) if (judge_path.parent / "card.json").is_file() \
        else {}
    return {
        "sample_accuracy": float((predicted == labels).mean()),
        "frechet_distance": frechet_distance(fake, test),
        "frechet_distance_real_train": frechet_distance(real, test),
        "sample_accuracy_per_label": {(data.labels or [])[c]: float((predicted[labels == c] == c).mean())
                                      for c in range(classes)},
        "samples": len(labels), "real_train_images": len(real_rows), "real_test_images": len(data.test.y),
        "real_train_accuracy": float((real_predicted == data.train.y[real_rows]).mean()),
        "pixel_range": [float(images.min()), float(images.max())],
        "judge": {"model": judge_path.parent.parent.name, "version": judge_version, "features": judge.features,
                  "feature_size": int(fake.shape[1]), "test_accuracy": card.get("test", {}).get("accuracy")},
        "method": "samples from the exported model in onnxruntime, z ~ N(0, I) seeded by train.seed, "
                  f"{per_label} per label; Frechet distance in the judge's penultimate features vs the test split; "
                  "the reference is as many real training images (the same count per label) vs the same test split",
    }
