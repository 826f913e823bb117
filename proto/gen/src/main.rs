//! Compile `proto/marketstore.proto` with protox and write the prost/tonic code to the given directory.
use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let proto_dir = args.next().ok_or("usage: mkts-protogen <proto dir> <out dir>")?;
    let out_dir = args.next().ok_or("usage: mkts-protogen <proto dir> <out dir>")?;
    let file = format!("{proto_dir}/marketstore.proto");
    let fds = protox::compile([file.as_str()], [proto_dir.as_str()])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".proto.NumpyDataset.column_data")
        .out_dir(&out_dir)
        .compile_fds(fds)?;
    Ok(())
}
