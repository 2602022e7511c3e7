"""The two-tower retrieval model, built from the NVTabular output schema (user and item towers by tag)."""

from __future__ import annotations

from typing import Any


def two_tower_schema(schema: Any) -> Any:
    """User and item features and ids only: no context, targets, raw ids or time."""
    from merlin.schema import Tags

    return schema.select_by_tag([Tags.USER, Tags.ITEM]).excluding_by_tag("raw_id")


def frequency_in_batch_sampler(item_probabilities: Any) -> Any:
    """In-batch negatives that report each item's sampling probability, for the logQ correction.

    Merlin 23.08's in-batch sampler reports none, so its logQ correction cannot run. An item's chance
    to be an in-batch negative is its share of the training positives, known exactly from the data.
    """
    import merlin.models.tf as mm
    import tensorflow as tf

    class FrequencyInBatchSampler(mm.InBatchSamplerV2):  # type: ignore[misc, name-defined]
        def __init__(self, probabilities: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._log_table = tf.constant(probabilities, dtype=tf.float32)

        def with_sampling_probs(self, items: Any) -> Any:
            ids = tf.reshape(tf.cast(items.id, tf.int32), [-1])
            # (n, 1): ContrastiveOutput subtracts log(p) from (batch, 1) positive and, transposed, from negative scores.
            return items.with_sampling_prob(tf.expand_dims(tf.gather(self._log_table, ids), -1))

    return FrequencyInBatchSampler(item_probabilities)


def build_two_tower(schema: Any, *, tower_layers: tuple[int, ...] = (128, 64), item_probabilities: Any | None = None,
                    logits_temperature: float = 1.0, l2_normalize: bool = False) -> Any:  # fmt: skip
    """Query (user) and candidate (item) towers scored by dot product, trained with in-batch negatives.

    With `item_probabilities` (indexed by encoded item id), the sampling-bias (logQ) correction of
    Yi et al., RecSys 2019: in-batch negatives are drawn in proportion to popularity, which without
    the correction teaches the towers to push popular items down.

    With `l2_normalize` both towers end in an L2 normalization, so their dot product is a cosine, which lies in
    [-1, 1]: without a temperature below 1 the softmax over the batch can barely tell a positive from the
    negatives. The temperature is the query tower's last layer (its output times 1 / T), not Merlin's
    `logits_temperature`, for two reasons: the logQ correction is then subtracted from cosine / T as in Yi et al.
    (Merlin divides the corrected logits, so a T of 0.1 would multiply the correction by 10), and the saved query
    tower carries it, so batch scoring, Faiss and Triton score with the logits the model was trained on.
    """
    import merlin.models.tf as mm
    import tensorflow as tf
    from merlin.schema import Tags

    schema = two_tower_schema(schema)
    layers = list(tower_layers)

    def tower(tag: Tags) -> Any:
        blocks = [mm.MLPBlock(layers, no_activation_last_layer=True)] + ([mm.L2Norm()] if l2_normalize else [])
        if tag == Tags.USER and logits_temperature != 1.0:
            blocks.append(tf.keras.layers.Rescaling(1.0 / logits_temperature, name="temperature"))
        return mm.Encoder(schema.select_by_tag(tag), *blocks)

    if item_probabilities is None:
        return mm.TwoTowerModelV2(tower(Tags.USER), tower(Tags.ITEM))
    sampler = frequency_in_batch_sampler(item_probabilities)
    return mm.TwoTowerModelV2(tower(Tags.USER), tower(Tags.ITEM), negative_samplers=[sampler],
                              logq_sampling_correction=True)  # fmt: skip
