"""What a build against torch's headers outside cpp_extension needs to know (tests/fuzz_asan.py,
.ci/check_cuda_kernels). setup.py and cpp_extension.load let torch add its own flags."""
import re

import torch


def torch_cxx_standard() -> str:
    """C++20 from torch 2.14 (its ATen.h refuses older standards), C++17 before."""
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    return "c++20" if version >= (2, 14) else "c++17"


if __name__ == "__main__":
    print(torch_cxx_standard())
