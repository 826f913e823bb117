//! Compile `proto/marketstore.proto` and `proto/replication.proto` with protox and write the prost/tonic
//! code to the given directory (one file per package: `proto.rs`, `mkts.replication.rs`).
use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let proto_dir = args.next().ok_or("usage: mkts-protogen <proto dir> <out dir>")?;
    let out_dir = args.next().ok_or("usage: mkts-protogen <proto dir> <out dir>")?;
    let files = [format!("{proto_dir}/marketstore.proto"), format!("{proto_dir}/replication.proto")];
    let fds = protox::compile(files.iter().map(String::as_str), [proto_dir.as_str()])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".proto.NumpyDataset.column_data")
        .bytes(".mkts.replication")
        .out_dir(&out_dir)
        .compile_fds(fds)?;
    Ok(())
}
