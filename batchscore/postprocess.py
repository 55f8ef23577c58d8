"""Postprocess: logits → top-k labels and probabilities, as plain Arrow lists.

Softmax for single-label checkpoints, sigmoid for `problem_type: multi_label_classification`
(as transformers' image-classification pipeline does), then the k most probable classes,
most probable first; `top_k=0` keeps every class. Runs inside the inference actor so full
logits never cross the object store.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from batchscore.errors import code_of


class Postprocessor:
    """Turns a [N, C] logits tensor into (class indices, probabilities), each [N, k]."""

    def __init__(self, labels: tuple[str, ...], top_k: int, multi_label: bool):
        self.labels = np.array(labels, dtype=object)
        self.k = len(labels) if top_k == 0 else min(top_k, len(labels))
        self.multi_label = multi_label

    def __call__(self, logits):
        import torch

        logits = logits.float()
        if logits.shape[-1] != len(self.labels):
            raise ValueError(
                f"model returned {logits.shape[-1]} logits per image but config.json id2label names "
                f"{len(self.labels)} classes"
            )
        scores = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        probs, idx = torch.topk(scores, self.k, dim=-1, sorted=True)
        return idx.cpu().numpy(), probs.cpu().numpy().astype(np.float32)

    def table(self, ids: np.ndarray, errors: list, idx: np.ndarray, probs: np.ndarray, meta: np.ndarray) -> pa.Table:
        """Rows of `id, labels, probs, error, error_code, meta`; rows with an error have null labels and probs.

        `errors` holds "" for rows without an error; `idx` and `probs` hold one row per such
        row, in input order.
        """
        errors = [str(e) if e else None for e in errors]
        valid = np.array([e is None for e in errors], dtype=bool)
        counts = np.where(valid, self.k, 0)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        mask = pa.array(~valid)
        labels = pa.ListArray.from_arrays(offsets, pa.array(self.labels[idx.reshape(-1)].tolist(), pa.string()),
                                          mask=mask)
        scores = pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1), pa.float32()), mask=mask)
        return pa.table({
            "id": pa.array([str(i) for i in ids], pa.string()),
            "labels": labels,
            "probs": scores,
            "error": pa.array(errors, pa.string()),
            "error_code": pa.array([code_of(e) for e in errors], pa.string()),
            "meta": pa.array([str(m) for m in meta], pa.string()),
        })
