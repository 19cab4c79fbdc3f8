"""Plots draw the user's class names as text, whatever they contain."""

import io

import pytest
from PIL import Image

from worker.training.plots import confusion_matrix_png


@pytest.mark.parametrize(
    "names",
    [
        [r"$\undefinedcmd$", "b"],
        ["$x$", "a_b^c", r"\frac{1}{2}", "$"],
        ["кошка", "犬", "émoji 🐈", "tab\tname"],
    ],
)
def test_the_confusion_matrix_renders_any_class_name_as_text(names):
    n = len(names)
    matrix = [[(i + j) % 3 for j in range(n)] for i in range(n)]
    png = confusion_matrix_png(matrix, names)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 100 and image.height > 100
