"""A YOLOv8n-like detector, MCU-sized: Conv(k, s) = Conv2d + BatchNorm + SiLU; C2f blocks (a 1x1 conv, chunk
into two, bottlenecks on one half, everything concatenated); SPPF (max-pool 5/1/2 three times,
concatenated); an FPN neck with nearest upsampling and concatenation; two heads (stride 4 and 8)."""
import torch
from torch import nn


class Conv(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, act=nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.cv1 = Conv(c, c, 3, act=act)
        self.cv2 = Conv(c, c, 3, act=act)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, cin, cout, n=1, act=nn.SiLU):
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1, act=act)
        self.m = nn.ModuleList(Bottleneck(self.c, act) for _ in range(n))
        self.cv2 = Conv((2 + n) * self.c, cout, 1, act=act)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout, act=nn.SiLU):
        super().__init__()
        c = cin // 2
        self.cv1 = Conv(cin, c, 1, act=act)
        self.cv2 = Conv(c * 4, cout, 1, act=act)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloV8nLike(nn.Module):
    """Outputs (N, classes + 4, 8, 8) and (N, classes + 4, 4, 4) for a 32x32 input; ``act`` is nn.SiLU as in
    YOLOv8 (nn.ReLU gives the same structure without the pointwise op)."""

    def __init__(self, cin=1, classes=10, act=nn.SiLU):
        super().__init__()
        self.stem = Conv(cin, 8, 3, 2, act)  # 16
        self.b1 = nn.Sequential(Conv(8, 16, 3, 2, act), C2f(16, 16, 1, act))  # 8
        self.b2 = nn.Sequential(Conv(16, 32, 3, 2, act), C2f(32, 32, 1, act), SPPF(32, 32, act))  # 4
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(48, 16, 1, act)  # 8
        self.head8 = nn.Conv2d(16, classes + 4, 1)
        self.down = Conv(16, 16, 3, 2, act)
        self.neck4 = C2f(48, 32, 1, act)  # 4
        self.head4 = nn.Conv2d(32, classes + 4, 1)

    def forward(self, x):
        p3 = self.b1(self.stem(x))
        p4 = self.b2(p3)
        n3 = self.neck(torch.cat([self.up(p4), p3], 1))
        n4 = self.neck4(torch.cat([self.down(n3), p4], 1))
        return self.head8(n3), self.head4(n4)
