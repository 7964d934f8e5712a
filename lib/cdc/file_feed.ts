/**
 * The change feed as a node's JSON-lines file: one event per line, rotated
 * by size (`<file>.1` the newest of the rotated ones), with the feed's
 * position kept in `<file>.position` after the lines it covers are on disk.
 *
 * @module
 */
import type { FeedEvent } from "./cdc_event.ts";
import {
  type FeedPosition,
  type FeedSink,
  startPosition,
} from "./change_feed.ts";

/** Options for {@linkcode FileSink.open}. */
export interface FileSinkOptions {
  /** Bytes at which the file is rotated. */
  maxBytes: number;
  /** Rotated files kept. */
  keep: number;
}

/** Milliseconds between writes of a position that covers no new line. */
const POSITION_EVERY_MS = 1000;

/** Appends events to a rotating JSON-lines file. */
export class FileSink implements FeedSink {
  readonly path: string;
  /** Where the feed starts: the position kept last time. */
  readonly position: FeedPosition;
  #options: FileSinkOptions;
  #file: Deno.FsFile;
  #size: number;
  #dirty: FeedPosition | undefined;
  #lastSaved = 0;

  private constructor(
    path: string,
    position: FeedPosition,
    options: FileSinkOptions,
    file: Deno.FsFile,
    size: number,
  ) {
    this.path = path;
    this.position = position;
    this.#options = options;
    this.#file = file;
    this.#size = size;
  }

  /**
   * Opens the file for appending, and reads the position kept beside it.
   *
   * @throws {Error} naming the file when it cannot be opened, or when its
   *   position file cannot be read
   */
  static async open(path: string, options: FileSinkOptions): Promise<FileSink> {
    let position = startPosition();
    try {
      const kept = JSON.parse(await Deno.readTextFile(`${path}.position`));
      if (
        !Array.isArray(kept.shards) || typeof kept.schema !== "number" ||
        !kept.shards.every((n: unknown) => Number.isSafeInteger(n))
      ) {
        throw new Error("it is not a change feed position");
      }
      position = {
        ...(Number.isSafeInteger(kept.generation)
          ? { generation: kept.generation }
          : {}),
        shards: kept.shards,
        schema: kept.schema,
      };
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) {
        throw new Error(
          `Cannot read the change feed position "${path}.position": ${
            e instanceof Error ? e.message : e
          } (remove it to write the feed again from the streams' start)`,
        );
      }
    }
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { append: true, create: true });
    } catch (e) {
      throw new Error(
        `Cannot open the change feed file "${path}": ${
          e instanceof Error ? e.message : e
        }`,
      );
    }
    const { size } = await file.stat();
    return new FileSink(path, position, options, file, size);
  }

  async write(events: FeedEvent[], position: FeedPosition): Promise<void> {
    if (events.length === 0) {
      this.#dirty = position;
      if (Date.now() - this.#lastSaved >= POSITION_EVERY_MS) {
        await this.#savePosition(position);
      }
      return;
    }
    const bytes = new TextEncoder().encode(
      events.map((e) => JSON.stringify(e)).join("\n") + "\n",
    );
    if (this.#size > 0 && this.#size + bytes.length > this.#options.maxBytes) {
      await this.#rotate();
    }
    let at = 0;
    while (at < bytes.length) at += await this.#file.write(bytes.subarray(at));
    this.#size += bytes.length;
    await this.#file.syncData();
    await this.#savePosition(position);
  }

  async #savePosition(position: FeedPosition): Promise<void> {
    const tmp = `${this.path}.position.tmp`;
    await Deno.writeTextFile(tmp, JSON.stringify(position));
    await Deno.rename(tmp, `${this.path}.position`);
    this.#lastSaved = Date.now();
    this.#dirty = undefined;
  }

  async #rotate(): Promise<void> {
    this.#file.close();
    const { keep } = this.#options;
    await Deno.remove(`${this.path}.${keep}`).catch(() => {});
    for (let i = keep - 1; i >= 1; i--) {
      await Deno.rename(`${this.path}.${i}`, `${this.path}.${i + 1}`).catch(
        () => {},
      );
    }
    await Deno.rename(this.path, `${this.path}.1`);
    this.#file = await Deno.open(this.path, { append: true, create: true });
    this.#size = 0;
  }

  /** Keeps the last position and closes the file. */
  async close(): Promise<void> {
    if (this.#dirty) await this.#savePosition(this.#dirty).catch(() => {});
    this.#file.close();
  }
}
