"""How long the lists are by default: the candidates retrieval returns per user, the items a user's list keeps and
the similar items kept per item. Batch scoring, the Triton export, the gateway's online path, the CLI and the DAG's
Params all start from these, so that offline and online lists agree unless someone sets them apart."""

TOP_K = 500  # candidates retrieved per user (the report's TopK)
TOP_N = 100  # items kept per user after ranking
SIMILAR_N = 50  # similar items kept per item
