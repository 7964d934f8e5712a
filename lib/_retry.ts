/**
 * Waiting and retrying, for marmot's runtime code.
 *
 * @module
 */

/** Options for {@linkcode delay}. */
export interface DelayOptions {
  /** Rejects the delay with the signal's reason when it aborts. */
  signal?: AbortSignal | undefined;
}

/** Resolves after `ms`, or rejects when `options.signal` aborts. */
export function delay(ms: number, options: DelayOptions = {}): Promise<void> {
  const { signal } = options;
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Options for {@linkcode retry}. */
export interface RetryOptions {
  /** Stops retrying: the pending delay rejects with the signal's reason. */
  signal?: AbortSignal | undefined;
  /** Told of each failure before the next attempt (1 for the first). */
  onRetry?: (error: unknown, attempt: number) => void | Promise<void>;
  /**
   * Milliseconds to wait after failed attempt `attempt`.
   * @default {Math.min(2000, 100 * attempt)}
   */
  backoff?: (attempt: number) => number;
}

/**
 * Calls `fn` until it resolves, waiting between attempts; only the signal
 * ends it.
 *
 * @returns what `fn` resolved to
 */
export async function retry<T>(
  fn: (attempt: number) => Promise<T>,
  options: RetryOptions = {},
): Promise<T> {
  const backoff = options.backoff ?? ((n) => Math.min(2000, 100 * n));
  for (let attempt = 1;; attempt++) {
    options.signal?.throwIfAborted();
    try {
      return await fn(attempt);
    } catch (error) {
      options.signal?.throwIfAborted();
      await options.onRetry?.(error, attempt);
      await delay(backoff(attempt), { signal: options.signal });
    }
  }
}
