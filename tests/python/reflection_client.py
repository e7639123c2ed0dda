"""A gRPC client that knows nothing of Gantry's .proto files: it learns the API from the server
through gRPC server reflection, with the official `grpcio-reflection` client
(`ProtoReflectionDescriptorDatabase`, which speaks `grpc.reflection.v1alpha`), then builds a
request from JSON with the descriptors it learnt and calls a server-streaming method.

Usage: reflection_client.py HOST:PORT SERVICE METHOD REQUEST_JSON

Prints one JSON object: the services listed, the method's input and output types as learnt,
and the streamed replies (as JSON).
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main():
    addr, service, method, request_json = sys.argv[1:5]
    channel = grpc.insecure_channel(addr)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName(service)
    m = svc.FindMethodByName(method)
    request_class = GetMessageClass(m.input_type)
    reply_class = GetMessageClass(m.output_type)
    request = json_format.Parse(request_json, request_class())
    call = channel.unary_stream(
        f"/{service}/{method}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=reply_class.FromString,
    )
    replies = [json_format.MessageToDict(r) for r in call(request, timeout=120)]
    print(
        json.dumps(
            {
                "services": services,
                "input_type": m.input_type.full_name,
                "output_type": m.output_type.full_name,
                "replies": replies,
            }
        )
    )


if __name__ == "__main__":
    main()
