#!/usr/bin/env python3
"""An independent implementation of the original hellorpc.Sync service.

Built only from proto/hellorpc.proto (compiled at start with grpcio-tools),
with the plain meaning a node written from that file would give it:
Set merges each SyncData.data into namespace `type` and answers what it
applied; Get answers the values of the named keys that are present; GetAll
answers the whole map of each requested type, or of every type when the
request is empty. It knows nothing of podcache's additions.

Usage:
  legacy_peer.py serve ADDR [--seed TYPE:KEY=VALUE ...]   serve until stdin closes
  legacy_peer.py set ADDR TYPE KEY=VALUE ...                 call Set, print the answer as JSON
  legacy_peer.py getall ADDR [TYPE ...]                      call GetAll, print the answer as JSON
  legacy_peer.py get ADDR TYPE KEY ...                       call Get, print the answer as JSON

`serve` prints "READY <addr>" once listening, and each applied Set as a
JSON line "SET {...}" so the test can see what arrived.
"""

import json
import os
import sys
import tempfile
import threading
from concurrent import futures

import grpc
from grpc_tools import protoc


def load_generated():
    here = os.path.dirname(os.path.abspath(__file__))
    proto_dir = os.path.normpath(os.path.join(here, "..", "..", "proto"))
    out = tempfile.mkdtemp(prefix="hellorpc-py-")
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "hellorpc.proto"),
    ])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)
    import hellorpc_pb2  # noqa: E402
    import hellorpc_pb2_grpc  # noqa: E402
    return hellorpc_pb2, hellorpc_pb2_grpc


pb, pb_grpc = load_generated()


class SyncServicer(pb_grpc.SyncServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.state = {}  # type -> {key: value}

    def Get(self, request, context):
        response = pb.SyncResponse()
        with self.lock:
            for asked in request.data:
                found = {k: self.state[asked.type][k]
                         for k in asked.data
                         if k in self.state.get(asked.type, {})}
                response.data.add(type=asked.type, data=found)
        return response

    def Set(self, request, context):
        response = pb.SyncResponse()
        with self.lock:
            for item in request.data:
                self.state.setdefault(item.type, {}).update(item.data)
                response.data.add(type=item.type, data=dict(item.data))
        print("SET " + json.dumps([{"type": d.type, "data": dict(d.data)} for d in request.data]),
              flush=True)
        return response

    def GetAll(self, request, context):
        response = pb.SyncResponse()
        with self.lock:
            types = [d.type for d in request.data] if request.data else sorted(self.state)
            for t in types:
                response.data.add(type=t, data=self.state.get(t, {}))
        return response


def to_json(response):
    return json.dumps([{"type": d.type, "data": dict(d.data)} for d in response.data],
                      sort_keys=True)


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    command, addr, rest = argv[1], argv[2], argv[3:]
    if command == "serve":
        servicer = SyncServicer()
        for seed in rest[1:] if rest[:1] == ["--seed"] else rest:
            if seed == "--seed":
                continue
            type_part, kv = seed.split(":", 1)
            key, value = kv.split("=", 1)
            servicer.state.setdefault(int(type_part), {})[key] = value
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_SyncServicer_to_server(servicer, server)
        if server.add_insecure_port(addr) == 0:
            sys.exit(f"cannot listen on {addr}")
        server.start()
        print(f"READY {addr}", flush=True)
        sys.stdin.read()  # serve until the test closes our stdin
        server.stop(0)
        return
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.SyncStub(channel)
        if command == "set":
            request = pb.SyncRequest()
            data = dict(kv.split("=", 1) for kv in rest[1:])
            request.data.add(type=int(rest[0]), data=data)
            print(to_json(stub.Set(request, timeout=10)))
        elif command == "getall":
            request = pb.SyncRequest()
            for t in rest:
                request.data.add(type=int(t))
            print(to_json(stub.GetAll(request, timeout=10)))
        elif command == "get":
            request = pb.SyncRequest()
            request.data.add(type=int(rest[0]), data={k: "" for k in rest[1:]})
            print(to_json(stub.Get(request, timeout=10)))
        else:
            sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
