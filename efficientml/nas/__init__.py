"""Neural architecture search: a MobileNet-style search space, the once-for-all supernet (elastic
kernel, depth, width; progressive shrinking; subnets extracted as plain zoo models), analytical cost
predictors equal to ``analysis.profile``, a measured latency table, an MLP accuracy predictor, search
strategies under constraints (random, evolution, grid, REINFORCE, DARTS, ProxylessNAS), zero-shot proxies,
function-preserving net2net growth, TinyNAS, and block / cell spaces beyond MBConv."""

from efficientml.nas.blocks import BLOCKS, build_block
from efficientml.nas.cells import BlockArch, BlockSpace, CellNet, Genotype, sample_genotype
from efficientml.nas.costs import SubnetCost, subnet_cost
from efficientml.nas.gradient import darts_search, proxyless_search
from efficientml.nas.gradient_ops import MixedNet
from efficientml.nas.latency import LatencyTable, build_lut, lut_error
from efficientml.nas.net2net import deepen, widen
from efficientml.nas.ofa import OFANet, recalibrate_bn, resize
from efficientml.nas.ofa_train import ShrinkConfig, accuracy, evaluate_subnet, progressive_shrink
from efficientml.nas.predictor import AccuracyPredictor, error_vs_samples
from efficientml.nas.proxies import PROXIES, score
from efficientml.nas.rank import kendall_tau, spearman
from efficientml.nas.rl import rl_search
from efficientml.nas.search import (STRATEGIES, Constraints, SearchHistory, evolution_search, grid_search,
                                    pareto_front, random_search)
from efficientml.nas.space import Arch, MBSpace
from efficientml.nas.subnet import build_subnet, subnet_kwargs
from efficientml.nas.tinynas import space_statistics, tinynas

__all__ = [
    "Arch", "MBSpace", "build_subnet", "subnet_kwargs", "SubnetCost", "subnet_cost",
    "OFANet", "recalibrate_bn", "resize", "ShrinkConfig", "progressive_shrink", "accuracy", "evaluate_subnet",
    "LatencyTable", "build_lut", "lut_error", "AccuracyPredictor", "error_vs_samples",
    "Constraints", "SearchHistory", "STRATEGIES", "random_search", "evolution_search", "grid_search", "pareto_front",
    "PROXIES", "score", "spearman", "kendall_tau", "widen", "deepen", "space_statistics", "tinynas",
    "rl_search", "MixedNet", "darts_search", "proxyless_search", "BLOCKS", "build_block", "BlockSpace", "BlockArch",
    "CellNet", "Genotype", "sample_genotype",
]
