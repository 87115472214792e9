"""The process boundary: CLI (serve, launch, kit commands), the gRPC server with health, reflection and
SIGTERM drain, and the servicer that translates protobuf to and from the engine's domain types.
The only package that imports grpc or the generated stubs."""
