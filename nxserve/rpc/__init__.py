"""What both services share on the gRPC side (nxserve's bottom layer, with `nxserve.kv` and the
stubs in `nxserve.v1`): server start-up, health and signals (`server`), the error taxonomy
(`errors`) and its one mapping to status codes (`status`), the bounds every incoming field is
checked against (`validate`), TLS and API keys (`security`), protobuf conversion (`convert`),
engine and server flags (`flags`), tracing (`tracing`). It imports nxcore and grpc, never the services
or nxserve's command line, client and local cluster."""
