"""Named dependencies of the routes: settings and a database session per request.

What the lifespan built (`serving.api.main`) lives on `app.state`; these read it from there, so no
module holds a connection or a setting at import time, and tests build apps with their own settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from recsys.settings import Settings
from serving.api.schemas import INT64_MAX
from serving.live_features import LiveFeatures
from serving.recommender import Recommender
from serving.seen_items import SeenItemsWriter


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; what a route did not commit is rolled back when it ends."""
    with request.app.state.sessionmaker() as session:
        yield session


def get_recommender(request: Request) -> Recommender:
    recommender: Recommender = request.app.state.recommender
    return recommender


def get_live_features(request: Request) -> LiveFeatures | None:
    """Feast on the online path, where the settings turn it on (`live_features`)."""
    live: LiveFeatures | None = request.app.state.recommender.live
    return live


def get_seen_items(request: Request) -> SeenItemsWriter:
    writer: SeenItemsWriter = request.app.state.seen_items
    return writer


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
LiveFeaturesDep = Annotated[LiveFeatures | None, Depends(get_live_features)]
SeenItemsDep = Annotated[SeenItemsWriter, Depends(get_seen_items)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]

CustomerIdPath = Annotated[int, Path(gt=0, le=INT64_MAX, description="the customer's id")]
ProductIdPath = Annotated[int, Path(gt=0, le=INT64_MAX, description="the product's id")]
InteractionIdPath = Annotated[int, Path(gt=0, le=INT64_MAX, description="the interaction's id")]
