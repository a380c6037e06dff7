"""A read-only view of a dataset: some of its domains, and without its test split."""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import ChameleonUserError

__all__ = ["DatasetView"]


class DatasetView:
    """A :class:`~chameleon_ext.data.dataset.MixtureDataset` seen with only ``domains`` and,
    with ``hide_test`` (the default), without its test split: any read of it raises. Build it
    with :meth:`MixtureDataset.view`; ``chameleon compare`` builds every mixture on such a
    view, so no method can be fitted on the test split."""

    def __init__(self, base, domains: Optional[Sequence[str]] = None, hide_test: bool = True):
        self._base = getattr(base, "_base", base)
        self.domains = list(base.domains if domains is None else domains)
        unknown = [d for d in self.domains if d not in self._base.domains]
        if unknown:
            raise ChameleonUserError(f"domains {unknown} are not in the dataset (it has {self._base.domains})")
        if not self.domains:
            raise ChameleonUserError("a dataset view needs at least one domain")
        self.hide_test = hide_test

    def __getattr__(self, name):
        attr = getattr(self._base, name)
        if not callable(attr):
            return attr

        def guarded(*args, **kwargs):  # any other reader given split="test" is refused too
            if kwargs.get("split") == "test":
                self._split("test")
            return attr(*args, **kwargs)

        return guarded

    def _split(self, split: str) -> str:
        if split == "test" and self.hide_test:
            raise ChameleonUserError("the test split is held out: no mixture method may read it "
                                     "(only the final evaluation of the base models does)")
        return split

    def _domain(self, name: str) -> str:
        if name not in self.domains:
            raise ChameleonUserError(f"domain {name!r} is not in this view of the data ({self.domains})")
        return name

    def tokens(self, name, split="train"):
        return self._base.tokens(self._domain(name), self._split(split))

    def test_tokens(self, name):
        return self.tokens(name, "test")

    def n_tokens(self, name, split="train"):
        return self._base.n_tokens(self._domain(name), self._split(split))

    def sample_windows(self, name, n, length, rng, split="train"):
        return self._base.sample_windows(self._domain(name), n, length, rng, self._split(split))

    def sample_window(self, name, length, rng, split="train"):
        return self._base.sample_window(self._domain(name), length, rng, self._split(split))

    def draw_windows(self, name, n, length, rng, split="train"):  # the streamed-data reader
        return self._base.draw_windows(self._domain(name), n, length, rng, self._split(split))

    def windows_at(self, name, starts, length, split="train"):
        return self._base.windows_at(self._domain(name), starts, length, self._split(split))

    def check_window(self, length, split="train", domains=None):
        return self._base.check_window(length, self._split(split),
                                       [self._domain(d) for d in (domains or self.domains)])
