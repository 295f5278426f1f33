from collections.abc import Callable, Iterator

import pytest

from tests.helpers.shared_sandbox import ChannelView, module_sandboxes


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], ChannelView]]:
    """A channel of one of the module's sandboxes for each test (one sandbox per latency)."""
    yield from module_sandboxes(tmp_path_factory)
