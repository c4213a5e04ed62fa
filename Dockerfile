# slimlm in a container. On a GPU host with a registry (the CUDA image, whose torch slimlm keeps):
#   docker build -t slimlm .
# Air-gapped, or on any base with Python and pip: docker/build-offline.sh makes a wheelhouse in docker/wheels/ on the
# host (and a Debian base with debootstrap when no base image is at hand), then builds with INSTALL=wheelhouse.
# Run (see the README's Docker section): the run directory and the model cache are volumes,
#   docker run --gpus all -v $PWD/runs:/work/runs -v $HOME/.cache/slimlm-docker:/cache -e HF_TOKEN \
#     slimlm run recipes/<recipe>.yaml
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM ${BASE} AS install
# index: pip installs slimlm and its dependencies from the package index (the host needs one);
# wheelhouse: only from docker/wheels/, with no index: the build reaches no network.
ARG INSTALL=index
ARG EXTRAS=""
# deepspeed is for the recipes whose distill stage names configs/accelerate/deepspeed-zero3.yaml (GPU hosts).
ARG EXTRA_PACKAGES="deepspeed"
# A venv that sees the base's packages: the CUDA image's torch satisfies slimlm's torch range, so pip keeps it.
# The dependencies come first, in a layer of their own, so a change to slimlm's code rebuilds only the next one.
COPY docker/wheels/ /wheels/
RUN python3 -m venv --system-site-packages /opt/slimlm \
 && if [ "$INSTALL" = wheelhouse ]; then \
      /opt/slimlm/bin/pip install --no-cache-dir --no-index --find-links /wheels -r /wheels/requirements.txt; \
    fi
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN if [ "$INSTALL" = wheelhouse ]; then \
      /opt/slimlm/bin/pip install --no-cache-dir --no-index --no-build-isolation --no-deps /src; \
    else \
      /opt/slimlm/bin/pip install --no-cache-dir "/src${EXTRAS:+[$EXTRAS]}" $EXTRA_PACKAGES; \
    fi

# The image itself: the base and the venv, without the wheelhouse the install stage read.
FROM ${BASE}
COPY --from=install /opt/slimlm /opt/slimlm
ENV PATH=/opt/slimlm/bin:$PATH \
    HF_HOME=/cache/huggingface \
    SLIMLM_CACHE=/cache/slimlm \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1
WORKDIR /work
COPY recipes ./recipes
COPY configs ./configs
COPY docker/entrypoint.py /usr/local/bin/slimlm-entrypoint
# The run directory (/work/runs) and the cache (/cache) are the caller's volumes; the entrypoint refuses a run
# without a writable run volume rather than leave its outputs in the container.
ENTRYPOINT ["python3", "/usr/local/bin/slimlm-entrypoint"]
CMD ["--help"]
