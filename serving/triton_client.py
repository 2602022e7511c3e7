"""The gateway's asynchronous client of the two Triton ensembles (their tensors: docs/serving.md, "Triton ensemble")."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np

from recsys.triton_repository import ENCODE_FEATURES
from serving.model_versions import versioned_name

RawList = tuple[list[int], list[float]]


def _unpadded(item_ids: np.ndarray, scores: np.ndarray) -> RawList:
    keep = item_ids >= 0  # the ensembles pad short lists with -1
    return item_ids[keep].tolist(), scores[keep].astype(float).tolist()


class TritonEnsembles:
    """`recommend` (raw user id in), `similar_products` (raw item ids in) and `encode_features`, over HTTP with a
    timeout.

    With `versioned`, Triton serves each published version's models under names of their own
    (`serving/model_versions.py`) and every call names the version it wants."""

    def __init__(self, url: str, timeout_s: float, *, versioned: bool = False) -> None:
        import tritonclient.http.aio as triton_http

        address = urlparse(url).netloc or url  # tritonclient takes host:port
        self.versioned = versioned
        self._http = triton_http
        self._client = triton_http.InferenceServerClient(address, conn_timeout=timeout_s)
        self._input_names: dict[str, frozenset[str]] = {}  # per model, from its metadata (asked once)

    def _input(self, name: str, value: np.ndarray) -> object:
        from tritonclient.utils import np_to_triton_dtype

        tensor = self._http.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        return tensor

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        result = await self._client.infer(
            model, [self._input(name, value) for name, value in inputs.items()],
            outputs=[self._http.InferRequestedOutput(name) for name in outputs],
        )  # fmt: skip
        return {name: result.as_numpy(name) for name in outputs}

    def _model(self, ensemble: str, version: str | None) -> str:
        if not self.versioned:
            return ensemble
        if version is None:
            raise ValueError(f"Triton serves versioned models: {ensemble} needs the version")
        return versioned_name(ensemble, version)

    async def _inputs_of(self, model: str) -> frozenset[str]:
        if model not in self._input_names:
            metadata = await self._client.get_model_metadata(model)
            self._input_names[model] = frozenset(tensor["name"] for tensor in metadata["inputs"])
        return self._input_names[model]

    async def recommend(self, user_id: int, *, top_k: int, version: str | None = None,
                        features: Mapping[str, np.ndarray] | None = None,
                        context: Mapping[str, np.ndarray] | None = None) -> RawList | None:  # fmt: skip
        """The ranked list of a user (temperature 0: the gateway samples itself); None for an unknown user.

        `features`: the user's encoded features (one row), e.g. from Feast; without, Triton looks the user up in
        its run's table. `context`: the request's encoded context features. Of both, only what the ensemble
        takes is sent (the query tower's columns, the ranker's context)."""
        model = self._model("recommend", version)
        given = {**(features or {}), **(context or {})}
        if given:
            accepted = await self._inputs_of(model)
            given = {name: value for name, value in given.items() if name in accepted}
        answer = await self._infer(model, {
            "user_id_raw": np.array([user_id], dtype=np.int64), "top_k": np.array([top_k], dtype=np.int32),
            "temperature": np.array([0.0], dtype=np.float32), **given,
        }, ("item_ids", "scores", "known_users"))  # fmt: skip
        if not bool(answer["known_users"][0]):
            return None
        return _unpadded(answer["item_ids"][0], answer["scores"][0])

    async def similar(self, item_ids: Sequence[int], *, version: str | None = None) -> dict[int, RawList]:
        """Similar products of each known item (unknown items are left out)."""
        ids = np.array(list(item_ids), dtype=np.int64)
        answer = await self._infer(self._model("similar_products", version), {"item_id_raw": ids},
                                   ("item_ids", "scores", "known_items"))  # fmt: skip
        return {
            int(item): _unpadded(ids, scores)
            for item, ids, scores, known in zip(item_ids, answer["item_ids"], answer["scores"], answer["known_items"],
                                                 strict=True)
            if known
        }  # fmt: skip

    async def encode(self, kind: str, rows: Sequence[Mapping[str, Any]], *, version: str | None = None
                     ) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
        """`rows` of raw values encoded by the version's fitted workflow ("user", "item" or "context" rows), and
        the unix time of the version's feature snapshot."""
        answer = await self._infer(self._model(ENCODE_FEATURES, version), {
            "kind": np.array([kind.encode()], dtype=object),
            "rows": np.array([json.dumps(dict(row)).encode() for row in rows], dtype=object),
        }, ("encoded", "snapshot_time"))  # fmt: skip
        return [json.loads(value) for value in answer["encoded"].reshape(-1)], int(answer["snapshot_time"][0])

    async def close(self) -> None:
        await self._client.close()
