"""Grids for people: captions wrapped whole at words, small images upscaled, bands that fit."""

from __future__ import annotations

import numpy as np
import pytest

from imagerag_jax import images

LONG = ("a green three on the right, a red seven on the left, both drawn thick and slightly "
        "slanted on a plain black background with nothing else in the picture")


@pytest.mark.parametrize("width", [10, 16, 31])  # the longest word has 10 letters
def test_a_long_prompt_is_wrapped_whole_at_words(width):
    lines = images.wrap_caption(LONG, width)
    assert len(lines) > 1 and max(len(line) for line in lines) <= width
    assert " ".join(lines) == LONG  # every word is there, in order, none cut
    assert all(word in LONG.split() for line in lines for word in line.split())


def test_an_overlong_word_is_the_only_split():
    word = "supercalifragilisticexpialidocious"
    lines = images.wrap_caption(f"a {word} seven", 10)
    # The long word starts its own line and is cut into line-long pieces; the short words stay whole.
    assert lines == ["a", "supercalif", "ragilistic", "expialidoc", "ious seven"]
    assert "".join(lines[1:4]) + lines[4].split()[0] == word


def test_newlines_start_lines_and_empty_captions_are_one_line():
    assert images.wrap_caption("lambda=0.882\na red 3 to the left", 12) == [
        "lambda=0.882", "a red 3 to", "the left"]
    assert images.wrap_caption("", 5) == [""]


def test_upscale_is_nearest_neighbour_to_the_smaller_side():
    small = np.arange(2 * 16 * 32 * 3, dtype=np.uint8).reshape(2, 16, 32, 3)
    big = images.upscale(small, 96)
    assert big.shape == (2, 96, 192, 3)
    np.testing.assert_array_equal(big[:, ::6, ::6], small)  # every block is one source pixel
    np.testing.assert_array_equal(big[:, 5::6, 5::6], small)
    large = np.zeros((1, 128, 128, 3), np.uint8)
    assert images.upscale(large, 96).shape == large.shape  # large enough: unchanged


def band_height(grid: np.ndarray, cell_h: int, pad: int = 4) -> int:
    """Rows of the first grid row's caption band: from below its image to the next image (or end)."""
    return grid.shape[0] - pad - cell_h - pad


def test_the_caption_band_grows_with_the_lines():
    cells = np.zeros((1, 2, 16, 32, 3), np.uint8)  # a miniature's canvases
    short = images.labelled_grid(cells, [["a red 3", "green 5"]])
    long = images.labelled_grid(cells, [[LONG, "green 5"]])
    # Upscaled: 16x32 canvases become 96x192 cells, two of them side by side.
    assert short.shape[1] == 2 * 192 + 3 * 4 and long.shape[1] == short.shape[1]
    lines = len(images.wrap_caption(LONG, 192 // 8))  # at most this many chars fit a 192 px line
    assert band_height(long, 96) > band_height(short, 96) * 2
    assert band_height(long, 96) >= lines * 10  # at least 10 px a line at the caption size
    # Where the text is drawn, pixels are dark; the whole band below the long caption has ink rows.
    band = long[4 + 96:, 4:4 + 192].min(axis=(1, 2))
    inked = np.nonzero(band < 128)[0]
    assert inked.size and inked[-1] > band_height(short, 96)


def test_each_row_gets_its_own_band():
    cells = np.zeros((2, 1, 96, 96, 3), np.uint8)
    both_short = images.labelled_grid(cells, [["x"], ["y"]])
    one_long = images.labelled_grid(cells, [[LONG], ["y"]])
    one_band = (both_short.shape[0] - 3 * 4 - 2 * 96) // 2
    assert one_long.shape[0] - both_short.shape[0] > 3 * one_band
