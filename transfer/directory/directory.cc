#include "transfer/directory/directory.h"

#include <string>

#include "transfer/directory/embedded_directory.h"
#include "transfer/directory/redis_directory.h"

namespace relaykv {

Result<std::unique_ptr<Directory>> OpenDirectory(std::string_view url,
                                                 const DirectoryOptions& options) {
  if (url.empty() || url == "embedded") {
    return std::unique_ptr<Directory>(std::make_unique<EmbeddedDirectory>(options));
  }
  if (url.starts_with("redis://")) {
    RELAYKV_ASSIGN_OR_RETURN(std::unique_ptr<RedisDirectory> redis,
                             RedisDirectory::Open(url, options));
    return std::unique_ptr<Directory>(std::move(redis));
  }
  return InvalidArgument("directory url '" + std::string(url) +
                         "' is not understood; accepted forms: \"embedded\" (or empty) for "
                         "this process only, \"redis://host:port[/db]\" for a shared Redis");
}

}  // namespace relaykv
