# syntax=docker/dockerfile:1
# attnscope containers.
#   CPU, from Debian 12 packages only (the same install/build scripts CI runs):
#     docker build --target cpu -t attnscope:cpu .
#   The CPU image's smoke test (a server inside the image, a capture, the file loaded; fails the
#   build on any error): --target smoke. deploy/image-check.sh builds both with podman, no Docker
#   engine needed; CI runs it.
#   CUDA, with a pinned CUDA libtorch 2.x on an official CUDA base (Ubuntu 24.04 ships the same
#   gRPC 1.51 / protobuf 3.21 / Abseil 20220623 as Debian 12):
#     docker build --target cuda -t attnscope:cuda .
ARG DEBIAN_IMAGE=debian:12
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.4.1-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu24.04

############################## CPU ##############################
FROM ${DEBIAN_IMAGE} AS cpu-build
WORKDIR /src
COPY deploy/install-deps.sh deploy/install-deps.sh
RUN bash deploy/install-deps.sh --build && rm -rf /var/lib/apt/lists/*
COPY . .
RUN rm -rf build && bash deploy/build.sh --product \
 && mkdir -p /opt/attnscope/bin /opt/attnscope/lib \
 && cp build/server/attnscope-server build/client/cpp/attnscope-capture build/tools/attnscope-run \
       build/tools/attnscope-tokenize /opt/attnscope/bin/ \
 && cp build/text/spm_shim/libattnscope_spm_shim.so /opt/attnscope/lib/ \
 && python3 tests/tools/checkpoint.py llama31_gqa /smoke/model --seed 1 \
 && mkdir -p /smoke/python && cp -r client/python/attnscope /smoke/python/ && cp deploy/smoke.sh /smoke/
# The programs' shared libraries, and nothing else of the build's packages, go to the runtime stage.
RUN bash deploy/bundle-libs.sh /opt/attnscope/lib /opt/attnscope/bin/* /opt/attnscope/lib/libattnscope_spm_shim.so

FROM ${DEBIAN_IMAGE} AS cpu
RUN useradd --system --uid 10001 --create-home attnscope
COPY --from=cpu-build /opt/attnscope /opt/attnscope
ENV PATH=/opt/attnscope/bin:$PATH LD_LIBRARY_PATH=/opt/attnscope/lib \
    ATTNSCOPE_SPM_SHIM=/opt/attnscope/lib/libattnscope_spm_shim.so
USER attnscope
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["attnscope-capture", "--health", "--server=127.0.0.1:50051"]
ENTRYPOINT ["attnscope-server", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9090"]

# The CPU image tested from inside a build (podman cannot run containers everywhere): no compiler or
# -dev package in it (and the libraries it holds listed), then a server on a small random-weight checkpoint, a capture, and the stored
# file loaded, as the image's non-root user. numpy (to load the file) is added to this stage only.
FROM cpu AS smoke
USER root
RUN dpkg-query -W -f '${Package}\n' | sort > /tmp/runtime-packages \
 && echo "smoke: the runtime image holds the base's $(wc -l < /tmp/runtime-packages) packages and" \
         "$(ls /opt/attnscope/lib | wc -l) libraries ($(du -sh /opt/attnscope/lib | cut -f1)):" \
         "$(ls /opt/attnscope/lib | tr '\n' ' ')" | tee /etc/attnscope-runtime-report \
 && if grep -E -- '-dev$|^(gcc|g\+\+|cpp|clang|cmake|make|build-essential)(-[0-9.]+)?$' /tmp/runtime-packages; then \
      echo "smoke: build tools or -dev packages in the runtime image (above)" >&2; exit 1; fi \
 && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-numpy \
 && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-build /smoke /smoke
USER attnscope
# A value of its own per check (deploy/image-check.sh passes one), so that the smoke test runs every
# time instead of being taken from the layer cache of an earlier build of the same tree.
ARG SMOKE_RUN=unset
RUN echo "smoke: run $SMOKE_RUN" && cat /etc/attnscope-runtime-report && bash /smoke/smoke.sh

############################## CUDA ##############################
FROM ${CUDA_DEVEL_IMAGE} AS cuda-build
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu124/libtorch-cxx11-abi-shared-with-deps-2.4.1%2Bcu124.zip
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config curl unzip ca-certificates \
      libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev libsentencepiece-dev \
      libabsl-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev libcpp-httplib-dev \
      libgtest-dev python3 \
 && rm -rf /var/lib/apt/lists/* \
 && curl -fsSL -o /tmp/libtorch.zip "$LIBTORCH_URL" && unzip -q /tmp/libtorch.zip -d /opt && rm /tmp/libtorch.zip
WORKDIR /src
COPY . .
RUN rm -rf build \
 && JOBS="$(nproc)" bash deploy/build.sh --product -- -DCMAKE_PREFIX_PATH=/opt/libtorch \
 && mkdir -p /opt/attnscope/bin /opt/attnscope/lib \
 && cp build/server/attnscope-server build/client/cpp/attnscope-capture build/tools/attnscope-run /opt/attnscope/bin/ \
 && cp build/text/spm_shim/libattnscope_spm_shim.so /opt/attnscope/lib/

FROM ${CUDA_RUNTIME_IMAGE} AS cuda
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libgrpc++1.51t64 libprotobuf32t64 libsentencepiece0 libabsl20220623t64 libspdlog1.12 libpcre2-8-0 \
      libutf8proc3 libcpp-httplib0.14 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home attnscope
COPY --from=cuda-build /opt/libtorch/lib /opt/libtorch/lib
COPY --from=cuda-build /opt/attnscope /opt/attnscope
ENV PATH=/opt/attnscope/bin:$PATH LD_LIBRARY_PATH=/opt/libtorch/lib \
    ATTNSCOPE_SPM_SHIM=/opt/attnscope/lib/libattnscope_spm_shim.so
USER attnscope
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["attnscope-capture", "--health", "--server=127.0.0.1:50051"]
ENTRYPOINT ["attnscope-server", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9090", "--device=cuda"]
