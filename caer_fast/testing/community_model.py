"""The community CAER-S model re-stated in plain PyTorch from DESIGN.md §1, independently of
caer_fast.models, so that our CAERSNet can be checked against it without the community code.

Module names follow the community state_dict (shared/reference/caersnet_state_dict.tsv).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Encoder(nn.Module):
    def __init__(self, widths, pool=True):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:])])
        self.bn = nn.ModuleList([nn.BatchNorm2d(b) for b in widths[1:]])
        self.pool = pool

    def forward(self, x):
        last = len(self.convs) - 1
        for i in range(len(self.convs)):
            x = F.relu(self.bn[i](self.convs[i](x)))
            if self.pool and i < last:
                x = F.max_pool2d(x, 2)
        return x


class TwoStreamNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        widths = [3, 32, 64, 128, 256, 256]
        self.face_encoding_module = Encoder(widths)
        self.context_encoding_module = Encoder(widths)
        self.attention_inference_module = Encoder([256, 128, 1], pool=False)

    def forward(self, face, context):
        face = self.face_encoding_module(face)
        context = self.context_encoding_module(context)
        att = self.attention_inference_module(context)
        n, c, h, w = att.shape
        att = F.softmax(att.view(n, -1), dim=-1).view(n, c, h, w)
        return face, context * att


class FusionNetwork(nn.Module):
    def __init__(self, use_face=True, use_context=True, concat=False, num_class=7):
        super().__init__()
        self.face_bn, self.context_bn = nn.BatchNorm1d(256), nn.BatchNorm1d(256)
        self.use_face, self.use_context, self.concat = use_face, use_context, concat
        self.face_1, self.face_2 = nn.Linear(256, 128), nn.Linear(128, 1)
        self.context_1, self.context_2 = nn.Linear(256, 128), nn.Linear(128, 1)
        self.fc1, self.fc2 = nn.Linear(512, 128), nn.Linear(128, num_class)
        self.dropout = nn.Dropout()

    def forward(self, face, context):
        face = F.avg_pool2d(face, face.shape[2]).flatten(1)
        context = F.avg_pool2d(context, context.shape[2]).flatten(1)
        face, context = self.face_bn(face), self.context_bn(context)
        if not self.concat:
            sf = self.face_2(F.relu(self.face_1(face)))
            sc = self.context_2(F.relu(self.context_1(context)))
            w = F.softmax(torch.cat([sf, sc], dim=-1), dim=-1)
            face, context = face * w[:, :1], context * w[:, 1:]
        if not self.use_face:
            face = torch.zeros_like(face)
        if not self.use_context:
            context = torch.zeros_like(context)
        x = self.dropout(F.relu(self.fc1(torch.cat([face, context], dim=-1))))
        return self.fc2(x)


class CommunityCAERSNet(nn.Module):
    def __init__(self, use_face=True, use_context=True, concat=False):
        super().__init__()
        self.two_stream_net = TwoStreamNetwork()
        self.fusion_net = FusionNetwork(use_face, use_context, concat)

    def forward(self, face=None, context=None):
        return self.fusion_net(*self.two_stream_net(face, context))


def randomize_bn_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random BN affine parameters and running statistics, so eval mode is a real test."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
    return model
