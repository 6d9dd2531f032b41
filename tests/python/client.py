#!/usr/bin/env python3
"""An external client of Strata's gRPC API, in Python with grpcio.

The stubs are generated at run time from the repository's .proto files (proto/strata/v1), so
this checks the files themselves are the contract. Against a running region and global tier it:

1. calls Transact on a regiond (plaintext) to write two Machines of an app;
2. calls Query on it and checks the rows;
3. calls Route on a globald (mTLS) until the app's Machines are routed to the region;
4. checks that bad SQL gets INVALID_ARGUMENT and an unknown app NOT_FOUND.

Exits 0 when every answer is right; otherwise prints what was wrong and exits 1.
Needs: pip install grpcio grpcio-tools
"""

import argparse
import importlib
import os
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO, "proto")


def generate_stubs(out):
    """Compiles the .proto files into `out` and returns the imported modules."""
    files = ["strata/v1/api.proto", "strata/v1/global.proto"]
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
         f"--python_out={out}", f"--grpc_python_out={out}"] + files
    )
    if code != 0:
        sys.exit(f"protoc failed on {files} ({code})")
    sys.path.insert(0, out)
    names = ["strata.v1.api_pb2", "strata.v1.api_pb2_grpc",
             "strata.v1.global_pb2", "strata.v1.global_pb2_grpc"]
    return [importlib.import_module(n) for n in names]


def text(value):
    return value.text if value.WhichOneof("kind") == "text" else None


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region-api", required=True, help="host:port of a regiond API")
    parser.add_argument("--region", required=True, help="that regiond's region")
    parser.add_argument("--global-api", required=True, help="host:port of a globald API")
    parser.add_argument("--ca", required=True, help="the global tier's CA certificate")
    parser.add_argument("--cert", required=True, help="a client certificate it signed")
    parser.add_argument("--key", required=True, help="its key")
    parser.add_argument("--server-name", default="global.global.strata")
    parser.add_argument("--app", default="py-app")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        api_pb2, api_grpc, global_pb2, global_grpc = generate_stubs(out)

        region = api_grpc.StrataStub(grpc.insecure_channel(args.region_api))
        ids = [f"{args.app}-1", f"{args.app}-2"]
        statements = [
            api_pb2.Statement(
                sql="INSERT INTO machines (id, app, region, host, state, address, port) "
                    "VALUES (?1, ?2, ?3, 'py-host', 'started', '10.9.0.1', ?4)",
                params=[api_pb2.Value(text=machine_id), api_pb2.Value(text=args.app),
                        api_pb2.Value(text=args.region), api_pb2.Value(integer=8000 + n)],
            )
            for n, machine_id in enumerate(ids)
        ]
        written = region.Transact(api_pb2.TransactRequest(statements=statements), timeout=10)
        if written.version == 0 or len(written.site) != 16 or list(written.rows_affected) != [1, 1]:
            fail(f"Transact answered {written}")
        print(f"Transact: version {written.version}, rows {list(written.rows_affected)}")

        query = api_pb2.QueryRequest(statement=api_pb2.Statement(
            sql="SELECT id, port FROM machines WHERE app = ?1 ORDER BY id",
            params=[api_pb2.Value(text=args.app)]))
        columns, rows = [], []
        for message in region.Query(query, timeout=10):
            columns = columns or list(message.columns)
            rows.extend(message.rows)
        got = [(text(r.values[0]), r.values[1].integer) for r in rows]
        if columns != ["id", "port"] or got != [(ids[0], 8000), (ids[1], 8001)]:
            fail(f"Query answered columns {columns}, rows {got}")
        print(f"Query: {got}")

        try:
            region.Transact(api_pb2.TransactRequest(
                statements=[api_pb2.Statement(sql="INSRT INTO machines VALUES (1)")]), timeout=10)
            fail("bad SQL was accepted")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                fail(f"bad SQL got {err.code()}: {err.details()}")
            print(f"bad SQL: {err.code().name}: {err.details()}")

        with open(args.ca, "rb") as ca, open(args.key, "rb") as key, open(args.cert, "rb") as cert:
            credentials = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
        channel = grpc.secure_channel(
            args.global_api, credentials,
            options=[("grpc.ssl_target_name_override", args.server_name)])
        global_tier = global_grpc.GlobalStub(channel)

        deadline = time.monotonic() + 20
        last = None
        while True:
            try:
                route = global_tier.Route(
                    global_pb2.RouteRequest(app=args.app, from_region=args.region), timeout=5)
                routed = sorted(text(r.values[0]) for r in route.machines)
                if route.region == args.region and routed == ids:
                    break
                last = f"region {route.region!r}, machines {routed}"
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            if time.monotonic() > deadline:
                fail(f"Route never named the app's machines; last answer: {last}")
            time.sleep(0.1)
        print(f"Route: {route.app} in {route.region}: {routed} (columns {list(route.columns)})")

        try:
            global_tier.Route(global_pb2.RouteRequest(app="no-such-app"), timeout=5)
            fail("Route of an unknown app succeeded")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                fail(f"Route of an unknown app got {err.code()}: {err.details()}")
            print(f"unknown app: {err.code().name}: {err.details()}")
    print("OK")


if __name__ == "__main__":
    main()
