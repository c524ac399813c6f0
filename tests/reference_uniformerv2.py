"""The official UniFormerV2 model (OpenGVLab/UniFormerV2 slowfast/models/uniformerv2_model.py), re-derived: the same
modules, names, layouts (tokens LND: [1 + HW, N * T, C]) and view/permute steps. One deliberate deviation: the
official LayerNorm casts to float32 always; here float64 stays float64 so the parity test can run in float64.

Used by tests/test_uniformerv2.py (parity) and bench/uniformerv2.py (the official forward as a peer), which loads it
by file path."""

from collections import OrderedDict

import torch
from torch import nn


class RefLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.type(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefLocalMHRA(nn.Module):
    def __init__(self, d_model, dw_reduction=1.5):
        super().__init__()
        re_d = int(d_model // dw_reduction)
        self.pos_embed = nn.Sequential(
            nn.BatchNorm3d(d_model), nn.Conv3d(d_model, re_d, 1),
            nn.Conv3d(re_d, re_d, (3, 1, 1), padding=(1, 0, 0), groups=re_d), nn.Conv3d(re_d, d_model, 1))

    def forward(self, x):
        return self.pos_embed(x)


class RefBlock(nn.Module):
    def __init__(self, d_model, n_head, no_lmhra, double_lmhra=True):
        super().__init__()
        self.no_lmhra, self.double_lmhra = no_lmhra, double_lmhra
        if not no_lmhra:
            self.lmhra1 = RefLocalMHRA(d_model)
            if double_lmhra:
                self.lmhra2 = RefLocalMHRA(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = RefLayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", RefQuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = RefLayerNorm(d_model)

    def _local(self, x, lmhra, T):
        tmp_x = x[1:, :, :]
        L, NT, C = tmp_x.shape
        N, H = NT // T, int(L ** 0.5)
        tmp_x = tmp_x.view(H, H, N, T, C).permute(2, 4, 3, 0, 1).contiguous()
        tmp_x = tmp_x + lmhra(tmp_x)
        tmp_x = tmp_x.view(N, C, T, L).permute(3, 0, 2, 1).contiguous().view(L, NT, C)
        return torch.cat([x[:1, :, :], tmp_x], dim=0)

    def forward(self, x, T):
        if not self.no_lmhra:
            x = self._local(x, self.lmhra1, T)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        if not self.no_lmhra and self.double_lmhra:
            x = self._local(x, self.lmhra2, T)
        return x + self.mlp(self.ln_2(x))


class RefExtractor(nn.Module):
    def __init__(self, d_model, n_head, mlp_factor=4.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        d_mlp = round(mlp_factor * d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_mlp)), ("gelu", RefQuickGELU()),
                                              ("dropout", nn.Dropout(0.5)), ("c_proj", nn.Linear(d_mlp, d_model))]))
        self.ln_2 = nn.LayerNorm(d_model)
        self.ln_3 = nn.LayerNorm(d_model)

    def attention(self, x, y):  # by hand from the nn.MultiheadAttention weights, as the official code
        d = self.ln_1.weight.size(0)
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = x @ w[:d].T + b[:d]
        k = y @ w[d:-d].T + b[d:-d]
        v = y @ w[-d:].T + b[-d:]
        Tx, Ty, N = q.size(0), k.size(0), q.size(1)
        h, hd = self.attn.num_heads, self.attn.head_dim
        q = q.view(Tx, N, h, hd).permute(1, 2, 0, 3)
        k = k.view(Ty, N, h, hd).permute(1, 2, 0, 3)
        v = v.view(Ty, N, h, hd).permute(1, 2, 0, 3)
        aff = (q @ k.transpose(-2, -1) / (hd ** 0.5)).softmax(dim=-1)
        return self.attn.out_proj((aff @ v).permute(2, 0, 1, 3).flatten(2))

    def forward(self, x, y):
        x = x + self.attention(self.ln_1(x), self.ln_3(y))
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, no_lmhra, return_list, num_classes, frozen=False):
        super().__init__()
        self.return_list, self.frozen = return_list, frozen
        self.resblocks = nn.ModuleList(RefBlock(width, heads, no_lmhra) for _ in range(layers))
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dpe = nn.ModuleList(nn.Conv3d(width, width, 3, padding=1, groups=width) for _ in return_list)
        self.dec = nn.ModuleList(RefExtractor(width, heads) for _ in return_list)
        self.proj = nn.Sequential(nn.LayerNorm(width), nn.Dropout(0.5), nn.Linear(width, num_classes))
        if not frozen:
            self.balance = nn.Parameter(torch.zeros(width))

    def forward(self, x, T_down):
        L, NT, C = x.shape
        N = NT // T_down
        H = W = int((L - 1) ** 0.5)
        cls_token = self.temporal_cls_token.repeat(1, N, 1)
        j = -1
        for i, resblock in enumerate(self.resblocks):
            x = resblock(x, T_down)
            if i in self.return_list:
                j += 1
                tmp_x = x.clone().view(L, N, T_down, C)
                tmp_feats = tmp_x[1:].permute(1, 3, 2, 0).reshape(N, C, T_down, H, W)
                tmp_feats = self.dpe[j](tmp_feats.clone()).view(N, C, T_down, L - 1).permute(3, 0, 2, 1)
                tmp_x = torch.cat([tmp_x[:1], tmp_x[1:] + tmp_feats], dim=0)  # = the official in-place slice add
                tmp_x = tmp_x.permute(2, 0, 1, 3).flatten(0, 1)  # T * L, N, C
                cls_token = self.dec[j](cls_token, tmp_x)
        if self.frozen:
            return self.proj(cls_token[0])
        weight = torch.sigmoid(self.balance)
        residual = x.view(L, N, T_down, C)[0].mean(1)
        return self.proj((1 - weight) * cls_token[0] + weight * residual)


class RefUniFormerV2(nn.Module):
    def __init__(self, img_size, patch, width, layers, heads, temporal_downsample, no_lmhra, return_list,
                 num_classes, frozen=False):
        super().__init__()
        if temporal_downsample:
            self.conv1 = nn.Conv3d(3, width, (3, patch, patch), (2, patch, patch), (1, 0, 0), bias=False)
        else:
            self.conv1 = nn.Conv3d(3, width, (1, patch, patch), (1, patch, patch), (0, 0, 0), bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((img_size // patch) ** 2 + 1, width))
        self.ln_pre = RefLayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads, no_lmhra, return_list, num_classes, frozen)

    def forward(self, x):
        x = self.conv1(x)
        N, C, T, H, W = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(N * T, H * W, C)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        return self.transformer(x, T)
