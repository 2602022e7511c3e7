"""The gateway's asynchronous client of the two Triton ensembles (their tensors: docs/serving.md, "Triton ensemble"),
over one Triton server or several.

With several servers (`RECSYS_TRITON_URL` lists them, comma-separated) the calls take turns (round robin), and a
call that fails on one server moves on to the next within the same request:
- a connection that fails (refused, reset, closed mid-answer: a server stopped or restarting) marks the server
  down for `down_for_s`; the others take its turns until then, after which it is tried again. Every call asks only
  for a computation (no state changes on the server), so asking the next server again is safe;
- an error the server answers with, other than a bad request (400: every server would refuse it alike), e.g. a
  version's models not loaded there yet, moves on without marking the server down.
A server that accepts the connection but does not answer is not detected here: the gateway's Triton budget
(`RECSYS_TRITON_TIMEOUT_MS`) bounds the request, which falls back as with one server (`triton_unavailable`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np

from recsys.recommendation_store import ScoredList
from recsys.triton_repository import ENCODE_FEATURES, ITEM_TOWER
from serving.model_versions import versioned_name

log = logging.getLogger(__name__)

RawList = tuple[list[int], list[float]]
CLICK_PROBABILITIES = "click_probabilities"  # the recommend ensemble's P(click) output (exports since issue 19)
Result = TypeVar("Result")
DOWN_FOR_S = 2.0  # how long a server whose connection failed is left out of the turns
# What a call's outcome is counted as, per server (GatewayMetrics.observe_triton).
ANSWERED, FAILED_OVER = "answered", "failed_over"


def _unpadded(item_ids: np.ndarray, scores: np.ndarray) -> RawList:
    keep = item_ids >= 0  # the ensembles pad short lists with -1
    return item_ids[keep].tolist(), scores[keep].astype(float).tolist()


class _Server:
    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.client = client
        self.down_until = 0.0  # time.monotonic() before which the server is left out of the turns


class TritonEnsembles:
    """`recommend` (raw user id in), `similar_products` (raw item ids in) and `encode_features`, over HTTP with a
    timeout, on one server or several (the module's docstring: turns and failover).

    With `versioned`, Triton serves each published version's models under names of their own
    (`serving/model_versions.py`) and every call names the version it wants. `observe(url, outcome)`, when set, is
    told of every call's outcome on each server it tried (ANSWERED, FAILED_OVER): the gateway's metrics."""

    def __init__(self, urls: str | Sequence[str], timeout_s: float, *, versioned: bool = False,
                 down_for_s: float = DOWN_FOR_S) -> None:  # fmt: skip
        import tritonclient.http.aio as triton_http
        from aiohttp import ClientConnectionError
        from tritonclient.utils import InferenceServerException

        self.versioned = versioned
        self.down_for_s = down_for_s
        self.observe: Callable[[str, str], None] | None = None
        self._http = triton_http
        self._connection_errors = (ClientConnectionError, ConnectionError)
        self._server_error = InferenceServerException
        self._servers = [
            _Server(url, triton_http.InferenceServerClient(urlparse(url).netloc or url, conn_timeout=timeout_s))
            for url in ([urls] if isinstance(urls, str) else urls)  # tritonclient takes host:port
        ]  # fmt: skip
        if not self._servers:
            raise ValueError("no Triton URL given")
        self._turn = 0
        self._tensor_names: dict[str, tuple[frozenset[str], frozenset[str]]] = {}  # per model: in, out

    async def _call(self, call: Callable[[Any], Awaitable[Result]]) -> Result:
        """`call(client)` on the servers in turn: the next server's turn first, the ones marked down last."""
        count = len(self._servers)
        start, self._turn = self._turn, (self._turn + 1) % count
        now = time.monotonic()
        turns = [self._servers[(start + offset) % count] for offset in range(count)]
        turns.sort(key=lambda server: server.down_until > now)  # stable: the turn order among the up ones
        for position, server in enumerate(turns):
            last = position == count - 1
            try:
                result = await call(server.client)
            except self._connection_errors as error:
                if server.down_until <= now:
                    log.warning("Triton at %s: %s; left out for %.1f s", server.url, str(error) or type(error).__name__,
                                self.down_for_s)  # fmt: skip
                server.down_until = time.monotonic() + self.down_for_s
                if last:
                    raise
            except self._server_error as error:
                if last or error.status() == "400":
                    raise
            else:
                server.down_until = 0.0
                self._observed(server.url, ANSWERED)
                return result
            self._observed(server.url, FAILED_OVER)
        raise AssertionError("unreachable: the last server's failure is raised")

    def _observed(self, url: str, outcome: str) -> None:
        if self.observe is not None:
            self.observe(url, outcome)

    def _input(self, name: str, value: np.ndarray) -> object:
        from tritonclient.utils import np_to_triton_dtype

        tensor = self._http.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        return tensor

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        tensors = [self._input(name, value) for name, value in inputs.items()]
        requested = [self._http.InferRequestedOutput(name) for name in outputs]
        result = await self._call(lambda client: client.infer(model, tensors, outputs=requested))
        return {name: result.as_numpy(name) for name in outputs}

    def _model(self, ensemble: str, version: str | None) -> str:
        if not self.versioned:
            return ensemble
        if version is None:
            raise ValueError(f"Triton serves versioned models: {ensemble} needs the version")
        return versioned_name(ensemble, version)

    async def _tensors_of(self, model: str) -> tuple[frozenset[str], frozenset[str]]:
        """The names of a model's inputs and outputs, from its metadata (asked once)."""
        if model not in self._tensor_names:
            metadata = await self._call(lambda client: client.get_model_metadata(model))
            self._tensor_names[model] = (frozenset(tensor["name"] for tensor in metadata["inputs"]),
                                         frozenset(tensor["name"] for tensor in metadata["outputs"]))  # fmt: skip
        return self._tensor_names[model]

    async def recommend(self, user_id: int, *, top_k: int, version: str | None = None,
                        features: Mapping[str, np.ndarray] | None = None,
                        context: Mapping[str, np.ndarray] | None = None,
                        fresh: Mapping[str, np.ndarray] | None = None) -> ScoredList | None:  # fmt: skip
        """The ranked list of a user (temperature 0: the gateway samples itself), with each item's P(click);
        None for an unknown user.

        `features`: the user's encoded features (one row), e.g. from Feast; without, Triton looks the user up in
        its run's table. `context`: the request's encoded context features. `fresh`: the products added since the
        run (`fresh_item_*` tensors, `serving.live_features.FreshProducts`). Of these, only what the ensemble
        takes is sent (the query tower's columns, the ranker's context, fresh products where the export knows
        them). An export from before the P(click) output gives the order scores for both."""
        model = self._model("recommend", version)
        accepted, produced = await self._tensors_of(model)
        given = {name: value for name, value in {**(features or {}), **(context or {}), **(fresh or {})}.items()
                 if name in accepted}  # fmt: skip
        clicks = (CLICK_PROBABILITIES,) if CLICK_PROBABILITIES in produced else ()
        answer = await self._infer(model, {
            "user_id_raw": np.array([user_id], dtype=np.int64), "top_k": np.array([top_k], dtype=np.int32),
            "temperature": np.array([0.0], dtype=np.float32), **given,
        }, ("item_ids", "scores", "known_users", *clicks))  # fmt: skip
        if not bool(answer["known_users"][0]):
            return None
        items, scores = _unpadded(answer["item_ids"][0], answer["scores"][0])
        click_probabilities = _unpadded(answer["item_ids"][0], answer[CLICK_PROBABILITIES][0])[1] if clicks else scores
        return items, scores, click_probabilities

    async def similar(self, item_ids: Sequence[int], *, version: str | None = None,
                      fresh: Mapping[str, np.ndarray] | None = None) -> dict[int, RawList]:  # fmt: skip
        """Similar products of each known item (unknown items are left out). `fresh`: products added since the run
        (`fresh_item_*` tensors), searched with their own embeddings where the ensemble takes them."""
        ids = np.array(list(item_ids), dtype=np.int64)
        model = self._model("similar_products", version)
        given = {}
        if fresh:
            accepted, _ = await self._tensors_of(model)
            given = {name: value for name, value in fresh.items() if name in accepted}
        answer = await self._infer(model, {"item_id_raw": ids, **given},
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

    async def embed_items(self, rows: Sequence[Mapping[str, Any]], *, version: str | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Encoded item rows (`encode`'s "item" output) -> their item-tower embeddings, packed columns, and whether
        the version's catalog knows each."""
        answer = await self._infer(self._model(ITEM_TOWER, version), {
            "rows": np.array([json.dumps(dict(row)).encode() for row in rows], dtype=object),
        }, ("item_embeddings", "item_features", "known_items"))  # fmt: skip
        return answer["item_embeddings"], answer["item_features"], answer["known_items"].reshape(-1)

    async def close(self) -> None:
        for server in self._servers:
            await server.client.close()
