"""MLflow's paged searches read to the end: the one page-token loop every `search_*` caller shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Page(Protocol[T_co]):
    """What MLflow's search methods return (a PagedList): the page's items, and the next page's token."""

    @property
    def token(self) -> str | None: ...

    def __iter__(self) -> Iterator[T_co]: ...


def all_pages(fetch: Callable[[str | None], Page[T]]) -> Iterator[T]:
    """Every item of every page, in order: `fetch(token)` reads one page (None for the first) until a page has no
    token. A page may hold items and no token: it is the last one."""
    token: str | None = None
    while True:
        page = fetch(token)
        yield from page
        token = page.token
        if not token:
            return
