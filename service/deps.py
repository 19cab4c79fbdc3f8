"""Dependencies shared by the routers, as typed aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from service.db import get_session
from service.settings import Settings, get_settings
from service.storage import ObjectStore, get_store

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _store(settings: SettingsDep) -> ObjectStore:
    return get_store(settings)


StoreDep = Annotated[ObjectStore, Depends(_store)]
