"""The build's thread settings: one count for every threaded library a batch calls (torch, OpenCV,
ONNX Runtime's next sessions), set for the build and given back after it."""

from __future__ import annotations

import cv2
import torch

from pipeline.threads import onnx_threads, using_model_threads


def test_a_builds_thread_count_reaches_each_library_and_is_given_back():
    torch_before, cv2_before, onnx_before = torch.get_num_threads(), cv2.getNumThreads(), onnx_threads()
    inside = 1 if cv2_before != 1 or torch_before != 1 else 2
    with using_model_threads(inside):
        assert (torch.get_num_threads(), cv2.getNumThreads(), onnx_threads()) == (inside, inside, inside)
    assert (torch.get_num_threads(), cv2.getNumThreads(), onnx_threads()) == (torch_before, cv2_before, onnx_before)
