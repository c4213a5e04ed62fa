# slimlm for GPU hosts. Build:  docker build -t slimlm .
# Run:  docker run --gpus all -v $HOME/.cache/huggingface:/cache/huggingface -v $PWD/runs:/work/runs \
#         -e HF_TOKEN slimlm run recipes/<recipe>.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV HF_HOME=/cache/huggingface \
    SLIMLM_CACHE=/cache/slimlm \
    PYTHONUNBUFFERED=1
WORKDIR /work

# The base image's CUDA torch (2.5.1) satisfies slimlm's torch range, so pip keeps it. deepspeed is for the
# recipes whose distill stage names configs/accelerate/deepspeed-zero3.yaml.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . deepspeed
COPY recipes ./recipes
COPY configs ./configs

VOLUME ["/cache", "/work/runs"]
ENTRYPOINT ["slimlm"]
CMD ["--help"]
