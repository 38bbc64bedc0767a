"""Build and install caer_fast.

Install with ``pip install --no-build-isolation -e .`` (build isolation would pull a CUDA torch).
The extension ``caer_fast._C`` (the op schemas, csrc/ops.cpp, their autograd formulas, csrc/autograd.cpp,
and the CPU kernels, csrc/cpu/*.cpp) is built on every machine; importing it registers the ops with torch.
The CUDA kernels (csrc/cuda/*.cu) are compiled in only where a CUDA build of torch and nvcc exist; set
``CAER_FAST_BUILD_CUDA=0`` to skip them, ``CAER_FAST_BUILD_EXT=0`` to build no extension at all.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("CAER_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    build_cuda = (os.environ.get("CAER_FAST_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
                  and shutil.which("nvcc") is not None)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) if build_cuda else []
    if cuda_sources:
        ext = CUDAExtension("caer_fast._C", cpu_sources + cuda_sources,
                            include_dirs=[os.path.join(HERE, "csrc")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("caer_fast._C", cpu_sources, include_dirs=[os.path.join(HERE, "csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="caer_fast",
    version="0.1.0",
    description="Fast CAER-Net: context-aware emotion recognition from video, with fused kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["caer_fast", "caer_fast.*"]) + ["caer_fast.kernels"],
    package_dir={"caer_fast.kernels": "kernels"},
    # the MTCNN face detector's weights (2 MB, MIT, from facenet-pytorch 2.6.0: see its LICENSE.md)
    package_data={"caer_fast.data": ["mtcnn_weights/*.pt", "mtcnn_weights/LICENSE.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    extras_require={
        # dlib's CNN face detector, the one the community used (python -m caer_fast.faces --detector dlib-cnn)
        "dlib": ["dlib-bin==20.0.1.post1", "face-recognition-models==0.3.0"],
        # every person in the scene: ByteTrack identities (caer_fast.data.tracking; also in requirements.txt)
        "people": ["supervision==0.30.9"],
        # --loader dali (GPU: NVDEC; CPU: VP8/VP9/MJPEG only)
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        # int8 CPU inference: caer_fast.quantize_int8, predict/serve --int8 (also in requirements.txt)
        "int8": ["torchao==0.18.0"],
        # the openvino serving engine (also in requirements.txt; `auto` measures it where installed)
        "openvino": ["openvino==2026.4.1"],
        # python -m caer_fast.annotate: Parquet output (pyarrow) and --ray (Ray Data); also in requirements-dev.txt
        "ray": ["ray[data]==2.60.0", "pyarrow==26.0.1"],
        # int8 video CAER-Net (caer_fast.models.openvino_int8): NNCF post-training quantization. An extra, not
        # requirements.txt: nncf pulls scikit-learn, joblib, narwhals, pydot, psutil, safetensors (~70 MB
        # installed, plus scipy) for one optional engine
        "openvino-int8": ["openvino==2026.4.1", "nncf==3.4.0"],
    },
    zip_safe=False,
)
