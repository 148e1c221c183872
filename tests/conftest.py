"""Shared test setup.

The tensors in these tests are tiny, so one intra-op thread is as fast as two on an idle machine
and avoids OpenMP oversubscription slowing the suite down many-fold when other work (a training
run, a parallel test runner) shares the two cores.
"""

import torch

torch.set_num_threads(1)
