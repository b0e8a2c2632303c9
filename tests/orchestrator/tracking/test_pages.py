"""orchestrator.tracking.pages.all_pages: every item of every page, fetched with the token the previous page gave."""

from __future__ import annotations

from collections.abc import Callable

from mlflow.store.entities.paged_list import PagedList

from orchestrator.tracking.pages import all_pages


def reader(pages: dict[str | None, PagedList[int]]) -> tuple[list[str | None], Callable[[str | None], PagedList[int]]]:
    """A fetch over `pages` by token, and the tokens it was asked for, in order."""
    asked: list[str | None] = []

    def fetch(token: str | None) -> PagedList[int]:
        asked.append(token)
        return pages[token]

    return asked, fetch


def test_an_empty_search_is_one_fetch_and_no_items() -> None:
    asked, fetch = reader({None: PagedList([], None)})
    assert list(all_pages(fetch)) == []
    assert asked == [None]


def test_one_page() -> None:
    asked, fetch = reader({None: PagedList([1, 2], None)})
    assert list(all_pages(fetch)) == [1, 2]
    assert asked == [None]


def test_three_pages_in_order_each_asked_with_the_previous_token() -> None:
    asked, fetch = reader({None: PagedList([1, 2], "a"), "a": PagedList([3], "b"), "b": PagedList([4, 5], None)})
    assert list(all_pages(fetch)) == [1, 2, 3, 4, 5]
    assert asked == [None, "a", "b"]


def test_a_page_with_items_and_an_empty_token_is_the_last() -> None:
    asked, fetch = reader({None: PagedList([1], "a"), "a": PagedList([2, 3], "")})
    assert list(all_pages(fetch)) == [1, 2, 3]
    assert asked == [None, "a"]
