"""The CUDA-graph training option where no CUDA graph can run: clear errors, not a silent eager run.
(tests/gpu/test_cuda_graph_gpu.py checks the graph against eager PyTorch on a GPU.)"""

import pytest
import torch

from ramba.train import train
from ramba.train.config import ConfigError, config_from_dict
from ramba.train.cuda_graph import GraphedLoss


def test_graphed_loss_needs_cuda_inputs_and_a_warmup():
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="warmup must be a positive int"):
        GraphedLoss(lambda x: (w * x).sum(), [w], warmup=0)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        GraphedLoss(lambda x: (w * x).sum(), [w])(torch.randn(3))
    assert w.grad is None


def test_train_refuses_cuda_graph_without_cuda(config_dict):
    with pytest.raises(ConfigError, match="'cuda_graph': needs a single CUDA process, got device cpu"):
        train(config_from_dict({**config_dict, "cuda_graph": True, "device": "cpu"}))
