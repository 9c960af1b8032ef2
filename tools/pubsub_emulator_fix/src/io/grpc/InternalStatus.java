/*
 * Shim for the Cloud Pub/Sub emulator 0.8.20 jar
 * (platform/pubsub-emulator/lib/cloud-pubsub-emulator-0.8.20-all.jar).
 *
 * The jar bundles io.grpc.internal.ServerImpl / ServerCallImpl from a newer grpc-java that call
 *   InternalStatus.asRuntimeException(Status, Metadata, boolean)
 * when a client cancels an RPC (RST_STREAM), but the io.grpc.InternalStatus class bundled
 * next to them is older and only has asRuntimeExceptionWithoutStacktrace(Status, Metadata).
 * The resulting NoSuchMethodError aborts the server-side close of a cancelled StreamingPull,
 * so the emulator keeps treating the dead stream as live and keeps pushing messages into it:
 * they are never delivered to any other subscriber (observed: lost for > 45 s).
 *
 * This class replaces io.grpc.InternalStatus when its compiled form is put AHEAD of the jar on
 * the classpath. It keeps everything the bundled class had (MESSAGE_KEY, CODE_KEY,
 * asRuntimeExceptionWithoutStacktrace) and adds the missing method, implemented with the
 * constructors this grpc version really has: StatusRuntimeException(Status, Metadata) and the
 * package-private InternalStatusRuntimeException(Status, Metadata), which suppresses the stack
 * trace exactly as upstream's fillInStackTrace=false does.
 *
 * Compiled by tools/pubsub_emulator.py (javac --release 8 against the jar) into
 * tools/pubsub_emulator_fix/build/.
 */
package io.grpc;

public final class InternalStatus {
  private InternalStatus() {}

  /** Key to bind status message to trailing metadata. */
  public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;

  /** Key to bind status code to trailing metadata. */
  public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

  /** As in the bundled (older) grpc-java. */
  public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(
      Status status, Metadata trailers) {
    return new InternalStatusRuntimeException(status, trailers);
  }

  /** The method the bundled (newer) ServerImpl/ServerCallImpl call on cancellation. */
  public static StatusRuntimeException asRuntimeException(
      Status status, Metadata trailers, boolean fillInStackTrace) {
    if (fillInStackTrace) {
      return new StatusRuntimeException(status, trailers);
    }
    return new InternalStatusRuntimeException(status, trailers);
  }
}
