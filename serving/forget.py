"""Forget a customer on request: every store that holds them, checked, and a tombstone that keeps them gone.

    python -m serving.forget 42 [43 ...]          # or: make forget-customer ID=42; the API: POST /customers/42/forget

`forget_customers(settings, ids)` erases, in this order:

1. the **database**: a tombstone row per id (`forgotten_customers`, the id alone), the customer and, with them,
   their interactions (ON DELETE CASCADE), in one transaction. The tombstone comes first, so a forget that
   fails half-way is retried to the end (every step is idempotent), and the API refuses to create the id again;
2. **Redis**: the id joins `{<prefix>recs}:forgotten`; their lists and cached online answers under every kept
   version (the list of versions, the current and previous pointers, versions still loading) are deleted and
   their bits in each version's known-users and live-users bitmaps cleared; their seen-items set is deleted.
   A publish erases the forgotten ids from its own version before switching to it, so a nightly run that read
   its data before the forget does not bring the lists back (tasks/publish_recommendations.py);
3. **Feast's online store**: the customer's row, every feature view's (`feature_repo.store.delete_online_rows`);
4. the **landing zone**: each day's extract that has rows of theirs is rewritten without them, aside and renamed
   over the old file (a reader sees the old file or the new one);
5. the **impression logs**: each hourly file that has lines of theirs is rewritten without them, under the lock
   the gateway's writer takes to append (`recsys.impression_log.remove_customers`), so no append is lost.

The nightly run reads the tombstones from the database and drops their rows from every input, the raw CSV
files included, before anything else sees them (`csv_to_parquet`'s `forgotten_users`); a later extract has no
rows of theirs, as the database has none. The result counts what each store gave up, the audit record.

Known limits: the gateway worker that answers the request drops its in-process copies of the customer's
answers; another worker's copy (answers kept for when Redis is down) answers no longer than the online cache's
TTL after it was kept (`RecommenderConfig.local_copy_ttl_s`). Finished runs' folders under `<data_root>/runs/`
keep what each run read until the nightly `expire_runs` removes them (tasks/expire_runs.py), MLflow's artifacts
until they are deleted; a remote (s3://) landing zone is not rewritten (the extracts are written locally).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.database import Customer, ForgottenCustomer, Interaction, create_database_engine, utc_now
from recsys.impression_log import remove_customers
from recsys.locations import INTERACTION_FILES, is_remote, local_path
from recsys.recommendation_store import RecommendationKeys, as_text, erase_users
from recsys.settings import Settings
from recsys.spec import DatasetSpec, load_spec
from serving.seen_items import seen_key

log = logging.getLogger(__name__)


def forget_customers(settings: Settings, customer_ids: Sequence[int], *, spec: DatasetSpec | None = None
                     ) -> dict[str, Any]:  # fmt: skip
    """Erase the customers from every store (see the module doc); return what each store gave up."""
    ids = sorted({int(customer) for customer in customer_ids})
    if not ids:
        raise ValueError("no customer id to forget")
    spec = spec or load_spec(settings.spec)
    report: dict[str, Any] = {"customer_ids": ids, **_forget_in_database(settings.database_url, ids)}
    report["redis_keys_deleted"] = _forget_in_redis(settings, ids)
    report["feast_rows_deleted"] = _forget_in_feast(settings, spec, ids)
    report.update(_forget_in_extracts(settings, spec, ids))
    lines, files = remove_customers(settings.impressions_path, ids)
    report.update(impression_lines_removed=lines, impression_files_rewritten=files)
    log.info("forgot customers %s: %s", ids, json.dumps(report))
    return report


def _forget_in_database(database_url: str, ids: list[int]) -> dict[str, int]:
    from sqlalchemy import CursorResult, delete, func, select
    from sqlalchemy.orm import Session

    engine = create_database_engine(database_url, timeout_ms=None)
    try:
        with Session(engine) as session, session.begin():
            known = set(session.scalars(select(ForgottenCustomer.id).where(ForgottenCustomer.id.in_(ids))))
            now = utc_now()
            session.add_all(ForgottenCustomer(id=customer, forgotten_at=now) for customer in ids
                            if customer not in known)  # fmt: skip
            interactions = session.scalar(select(func.count()).select_from(Interaction)
                                          .where(Interaction.customer_id.in_(ids)))  # fmt: skip
            # The interactions go with the customer rows (ON DELETE CASCADE, on SQLite too: foreign keys are on).
            customers = cast(CursorResult[Any], session.execute(delete(Customer).where(Customer.id.in_(ids)))).rowcount
    finally:
        engine.dispose()
    return {"customers_deleted": int(customers or 0), "interactions_deleted": int(interactions or 0)}


def _forget_in_redis(settings: Settings, ids: list[int]) -> int:
    from recsys.redis_connection import redis_client

    keys = RecommendationKeys(settings.redis_key_prefix)
    client = redis_client(settings.redis_url, settings.redis_type)
    try:
        # First the tombstone, then the versions: a publish reads the set after its load, so either it sees
        # the ids or its version is already listed as loading here.
        client.sadd(keys.forgotten, *ids)
        pointers = [client.get(keys.current), client.get(keys.previous)]
        versions = {as_text(version) for version in [*cast(list[Any], client.lrange(keys.versions, 0, -1)),
                                                     *cast(set[Any], client.smembers(keys.loading)),
                                                     *pointers] if version is not None}  # fmt: skip
        deleted = erase_users(client, keys, sorted(versions), ids)
        # DEL of several keys: redis-py's cluster client splits it by slot.
        deleted += int(cast(int, client.delete(*[seen_key(settings.redis_key_prefix, customer) for customer in ids])))
    finally:
        client.close()
    return deleted


def _forget_in_feast(settings: Settings, spec: DatasetSpec, ids: list[int]) -> int:
    from feature_repo.config import FeastStoreConfig
    from feature_repo.store import delete_online_rows, open_feature_store
    from feature_repo.tables import entity_tables

    config = FeastStoreConfig.from_settings(settings)
    if not config.registry_path.exists():  # nothing was ever applied, so nothing materialized
        return 0
    return delete_online_rows(open_feature_store(spec, config), entity_tables(spec)[0], ids, config)


def _forget_in_extracts(settings: Settings, spec: DatasetSpec, ids: list[int]) -> dict[str, Any]:
    """Rewrite each of the landing zone's extracts that has rows of these customers without them."""
    if is_remote(settings.landing_location):
        log.warning("landing zone %s is remote: its extracts are not rewritten (the nightly run drops the "
                    "forgotten customers' rows)", settings.landing_location)  # fmt: skip
        return {"extract_rows_removed": 0, "extract_files_rewritten": 0, "landing_zone_remote": True}
    landing = local_path(settings.landing_location)
    removed = rewritten = 0
    for pattern in INTERACTION_FILES:
        for path in sorted(landing.glob(pattern)):
            if path.name.startswith("."):  # an extract's staging file
                continue
            users = pq.read_table(path, columns=[spec.user_id]).column(spec.user_id)
            forgotten = pc.is_in(users, value_set=pa.array(ids, type=users.type))
            count = pc.sum(forgotten).as_py() or 0
            if not count:
                continue
            table = pq.read_table(path)
            staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
            try:
                pq.write_table(table.filter(pc.invert(forgotten)), staging)
                os.replace(staging, path)
            except BaseException:
                staging.unlink(missing_ok=True)
                raise
            removed += count
            rewritten += 1
    return {"extract_rows_removed": removed, "extract_files_rewritten": rewritten}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.forget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("customer_ids", nargs="+", type=int, metavar="CUSTOMER_ID")
    args = parser.parse_args(argv)
    from recsys.settings import get_settings
    from serving.api.migrate import ensure_schema_current

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    engine = create_database_engine(settings.database_url, timeout_ms=None)
    try:
        ensure_schema_current(engine)
    finally:
        engine.dispose()
    print(json.dumps(forget_customers(settings, args.customer_ids), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
